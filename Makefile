# The two set-up commands (see README):
#   make demo   install into .venv, then demo-data -> build -> serve -> info -> query -> metrics
#   make test   install into .venv with the test extras, then run the test suite
#
# TORCH_SPEC picks the torch build installed before the project (a CPU build is
# found locally when one is offered; on a GPU machine use e.g. TORCH_SPEC=torch).
#
# CPU_ONLY=1 installs without the CUDA libraries (about 1.2 GB of nvidia-* wheels that
# faiss-gpu, and torch from PyPI, pull in): faiss-cpu instead of faiss-gpu, torch's CPU
# build from TORCH_INDEX_URL, then the project with --no-deps, as deploy/Dockerfile's
# cpu variant does (deploy/image_requirements.py makes the list from pyproject.toml;
# Python 3.11+). Use a fresh VENV (or `make clean`): both faiss builds are the module
# `faiss`. Without CPU_ONLY the install is the same as always.
#   make install CPU_ONLY=1
#   make install CPU_ONLY=1 TORCH_INDEX_URL=    # torch from the configured indexes

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CPU_ONLY ?=
TORCH_INDEX_URL ?= $(if $(CPU_ONLY),https://download.pytorch.org/whl/cpu,)
PORT ?= 50051
METRICS_PORT ?= 9100
BIN := $(VENV)/bin
PYTEST_ARGS ?=
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:

.PHONY: install demo test lint proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
ifdef CPU_ONLY
	$(BIN)/python deploy/image_requirements.py pyproject.toml cpu test > $(VENV)/requirements-cpu.txt
	$(BIN)/pip install -q -r $(VENV)/requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
else
	$(BIN)/pip install -q -e ".[test]"
endif
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto: install
	$(BIN)/python proto/generate.py


demo: install
	$(BIN)/bankd demo-data --out data/shapes --n 2000
	$(BIN)/bankd build --data data/shapes/data.json --image-folder data/shapes --out bank/bank.faiss
	$(BIN)/bankd serve --index bank/bank.faiss --port $(PORT) --metrics-port $(METRICS_PORT) & pid=$$!
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT
	$(BIN)/python -c "from bankd_client import BankClient; BankClient('localhost:$(PORT)').wait_ready(120)"
	$(BIN)/bankd info --target localhost:$(PORT)
	$(BIN)/bankd query --target localhost:$(PORT) --image data/shapes/images/00001.png -k 5 --data data/shapes/data.json
	curl -s localhost:$(METRICS_PORT)/metrics | grep bankd_search_latency_seconds

clean:
	rm -rf $(VENV) data bank build dist *.egg-info
