# Every target sets itself up on a fresh clone: .venv is created and the project
# installed into it (pip install -e .[dev]) the first time, and again only when
# setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-fast demo setup clean-demo

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

# The edit-test loop: everything but the end-to-end runs marked `slow` (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

demo: $(STAMP)
	$(PY) tools/demo.py

clean-demo:
	rm -rf output/shapes_r18 data/shapes
