"""One file per revision, applied in order by lora_ops.db.upgrade_database."""
