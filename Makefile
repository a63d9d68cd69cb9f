# The two commands, each doing its own set-up on a fresh clone:
#   make run    the main job (GRPO on the embedded shapes world, CPU, no downloads)
#   make test   the test suite (what CI runs)
# The virtual environment is created and filled on first use, and again only when requirements.txt changes; `make test`
# also installs the optional rewards' packages (requirements-extras.txt), which their tests use for real.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: with a visible NVIDIA GPU (nvidia-smi -L lists one) the package index's default build (CUDA); else
# torch==2.13.0, which this project's machines and CI serve as a CPU build (elsewhere add
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu). A torch already in $(VENV) is kept.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(GPU),torch,torch==2.13.0)
TORCH_INDEX ?=

.PHONY: run test
run: $(VENV)/.installed
	$(PY) grpo.py

test: $(VENV)/.installed $(VENV)/.extras
	$(PY) -m pytest tests -q -p no:cacheprovider

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.extras: requirements-extras.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $@
