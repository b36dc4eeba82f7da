# make demo: a 2-process LoRA fine-tune of a tiny local model (CPU is enough).
# make test: the test suite without the slow tests (real accelerate launch / gloo subprocesses).
# make test-slow: the slow ones (kill loop, SLURM); CI runs both.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

# torch==2.13.0 only where no torch is installed: on these CPU machines it is the CPU build on disk;
# elsewhere pip's default Linux wheel (CUDA). An existing torch (e.g. a GPU build) is kept.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

demo: setup
	$(VENV)/bin/distlora tiny runs/tiny
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_ddp.yaml -m distlora.train --config configs/train/tiny.yaml

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
