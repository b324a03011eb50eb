# The two commands of the README. Each creates .venv/ when missing and installs the project first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch: from the machine's local wheel directory where it has one (the project
# machines do), else from PyTorch's CPU index, so pip never resolves the multi-GB CUDA build.
TORCH_SOURCE := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PIP_FLAGS := -q -c constraints.txt $(TORCH_SOURCE)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmprune run recipes/quickstart.yaml --out runs/quickstart --overwrite
	@echo "Report: runs/quickstart/report.md"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
