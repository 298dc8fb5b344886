# Every target sets itself up on a fresh clone: .venv is created and the project
# installed into it (pip install -e .[dev,export,report,tensorboard]: the tests, ONNX export,
# the HTML report and TensorBoard logging) the first time, and again only when setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-fast test-gpu gpu-session demo setup clean-demo chromium

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,export,report,tensorboard]'
	@touch $(STAMP)

# -rs: every skipped test is listed with its reason (a skip counted in the summary alone was
# once taken for the browser test; it was test_fuzz's empty known-bugs list). C4DET_BROWSER: the
# browser the chromium target found, which the report's browser test then runs (no skip).
# tests/parallel.py: two pytest processes at once, each a half of the files (the tests run one
# thread: one process left a core of a 2-core machine idle); the first prints as it runs, the other after.
test: $(STAMP) chromium
	C4DET_BROWSER="$$(command -v chromium || command -v chromium-browser || true)" $(PY) tests/parallel.py --processes 2 -- tests -q -rs

# The HTML report's browser test (tests/test_report.py) loads it in headless Chromium (Debian's
# `chromium`). Installed here only when missing, with apt-get (as root, else sudo -n); when that
# fails, make shows apt-get's last lines and goes on, and that one test skips, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); log=$$(mktemp); \
	  echo "installing chromium (apt-get) for the HTML report's browser test"; \
	  ($$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	   $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >$$log 2>&1 \
	  || { tail -n 3 $$log; echo "note: chromium could not be installed; the HTML report's browser test will be skipped"; }; \
	  rm -f $$log; }

# The edit-test loop: everything but the end-to-end runs marked `slow` (tests/conftest.py), as
# two processes like `test`.
test-fast: $(STAMP)
	$(PY) tests/parallel.py --processes 2 -- tests -q -m "not slow"

# The GPU suite (tests/test_cuda.py, marker `cuda`): every tool on CUDA, a few minutes on one GPU;
# where torch.cuda.is_available() is False its tests skip, saying why. It runs .venv's python where
# there is one, else python3 (the lent GPU machine: `source .gpu/setup.sh` first, see the README).
test-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) -m pytest tests -q -m cuda

# On the lent GPU machine (README, "Installing on a GPU machine"; after `source .gpu/setup.sh`):
# tools/gpu_session.py, which runs its steps with or without make: the GPU suite, the benchmark at
# Detectron2's test settings against torchvision's C4, the GPU levers' tables, the demo on the GPU
# with shapes_val in float32 and with test.amp. Each command's output goes to $(OUT) as it runs,
# every command runs even when one before it failed, $(OUT)/steps.txt has each one's seconds.
# One device call runs 600 s at most: `make gpu-session STEPS="suite bench"`, then STEPS="levers demo"
# (each step stops at its limit, tools/gpu_session.py DEFAULT_LIMITS). The levers' torch.compile rows are off by default
# (compiling R50 several times may not fit 15 minutes of device time): LEVERS_COMPILE=default.
# LIMITS="suite=250 bench=150" stops a step's commands at those seconds (a hang costs only its step).
OUT ?= output/gpu
STEPS ?=
LEVERS_COMPILE ?= off
LIMITS ?=
gpu-session:
	$(if $(wildcard $(PY)),$(PY),python3) tools/gpu_session.py --out $(OUT) --levers-compile $(LEVERS_COMPILE)$(foreach limit,$(LIMITS), --limit $(limit)) $(STEPS)

demo: $(STAMP)
	$(PY) tools/demo.py

clean-demo:
	rm -rf output/shapes_r18 data/shapes
