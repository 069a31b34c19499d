"""Prefect flows and tasks: thin wrappers that give lora_ops's pipeline steps a schedule,
retries, state and a UI."""
