# Every target sets itself up on a fresh clone: .venv is created and the project
# installed into it (pip install -e .[dev,export,report,tensorboard]: the tests, ONNX export,
# the HTML report and TensorBoard logging) the first time, and again only when setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-fast test-gpu gpu-session gpu-suite gpu-bench gpu-levers gpu-demo demo setup clean-demo chromium

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,export,report,tensorboard]'
	@touch $(STAMP)

# -rs: every skipped test is listed with its reason (a skip counted in the summary alone was
# once taken for the browser test; it was test_fuzz's empty known-bugs list). C4DET_BROWSER: the
# browser the chromium target found, which the report's browser test then runs (no skip).
test: $(STAMP) chromium
	C4DET_BROWSER="$$(command -v chromium || command -v chromium-browser || true)" $(PY) -m pytest tests -q -rs

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

# The edit-test loop: everything but the end-to-end runs marked `slow` (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

# The GPU suite (tests/test_cuda.py, marker `cuda`): every tool on CUDA, a few minutes on one GPU;
# where torch.cuda.is_available() is False its tests skip, saying why. It runs .venv's python where
# there is one, else python3 (the lent GPU machine: `source .gpu/setup.sh` first, see the README).
test-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) -m pytest tests -q -m cuda

# On the lent GPU machine (README, "Installing on a GPU machine"), each step's output (and the
# benchmarks' JSON) written to $(OUT) as it ends, every step run even when one before it failed:
# gpu-session = gpu-suite (the GPU suite), gpu-bench (the benchmark at Detectron2's test settings:
# 800x1088, 6000 -> 1000 proposals, random sane weights, in torchvision's ResNet layout: stride in
# the 3x3 conv, RGB, so --compare-torchvision can build torchvision's C4 from our weights),
# gpu-levers (the GPU levers' tables, docs/accel.md: inference and training) and gpu-demo (the
# demo trained on the GPU, then shapes_val in float32 and with test.amp). The steps are targets of
# their own, for a device slice too short for all of them. The levers' torch.compile rows are off
# by default (compiling R50 several times may not fit 15 minutes of device time):
# `make gpu-levers LEVERS_COMPILE=default` measures them. tests/test_benchmark_levers.py checks the
# benchmark command lines on the CPU.
OUT ?= output/gpu
LEVERS_COMPILE ?= off
RUN_PY = $(if $(wildcard $(PY)),$(PY),python3)
GPU_BENCH = --config configs/detectron2/faster_rcnn_R_50_C4_1x.yaml model.backbone.stride_in_1x1=false \
  model.input_format=RGB --device cuda --image-size 800 1088 --runs 5
GPU_DEMO = output/gpu_demo
# `make gpu-demo GPU_DEVICE=cpu`: the same steps on the CPU (the CPU demo's 6.5 minutes)
GPU_DEVICE ?= cuda
gpu-session: gpu-suite gpu-bench gpu-levers gpu-demo

gpu-suite:
	mkdir -p $(OUT)
	-$(MAKE) --no-print-directory test-gpu 2>&1 | tee $(OUT)/test-gpu.txt

gpu-bench:
	mkdir -p $(OUT)
	-$(RUN_PY) tools/benchmark.py $(GPU_BENCH) --compare-torchvision --no-data \
	  --json $(OUT)/benchmark.json 2>&1 | tee $(OUT)/benchmark.txt

gpu-levers:
	mkdir -p $(OUT)
	-$(RUN_PY) tools/benchmark.py $(GPU_BENCH) --levers --levers-compile $(LEVERS_COMPILE) \
	  --train-images 2 --json $(OUT)/levers.json 2>&1 | tee $(OUT)/levers.txt

gpu-demo:
	mkdir -p $(OUT)
	-$(RUN_PY) tools/demo.py --output-dir $(GPU_DEMO) device=$(GPU_DEVICE) 2>&1 | tee $(OUT)/demo.txt
	-for amp in false true; do $(RUN_PY) tools/eval.py --weights $(GPU_DEMO)/model_final.pth \
	  --output-dir $(GPU_DEMO)/shapes_val_amp_$$amp --overwrite device=$(GPU_DEVICE) \
	  'datasets.test=[shapes_val]' test.amp=$$amp 2>&1 | tee $(OUT)/eval-shapes_val-amp-$$amp.txt; done

demo: $(STAMP)
	$(PY) tools/demo.py

clean-demo:
	rm -rf output/shapes_r18 data/shapes
