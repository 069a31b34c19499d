"""Serving: one base model in memory, many customer adapters beside it, batched requests."""
