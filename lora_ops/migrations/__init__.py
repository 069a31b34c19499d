"""Alembic migrations of the service database; lora_ops.db applies them when it opens one."""
