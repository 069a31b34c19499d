"""Prefect flows and tasks: thin wrappers that give lora_ops's pipeline steps a schedule,
retries, state and a UI."""

import logging

# PREFECT_LOGGING_EXTRA_LOGGERS (set by `lora-ops worker`) gives lora_ops's logger Prefect's
# API handler but not a level, and the root logger's WARNING would drop the training steps
# and uploads that belong in a run's log.
logging.getLogger("lora_ops").setLevel(logging.INFO)
