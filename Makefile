# The two commands, each doing its own set-up on a fresh clone:
#   make run    the main job (GRPO on the embedded shapes world, CPU, no downloads)
#   make test   the test suite (what CI runs)
# The virtual environment is created and filled on first use, and again only when requirements.txt changes.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU build where the package index serves one for it (this project's machines and CI); on a GPU
# machine install the build for your CUDA version into $(VENV) first, and it is kept (pip sees it satisfied)
TORCH ?= torch==2.13.0

.PHONY: run test
run: $(VENV)/.installed
	$(PY) grpo.py

test: $(VENV)/.installed
	$(PY) -m pytest tests -q -p no:cacheprovider

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@
