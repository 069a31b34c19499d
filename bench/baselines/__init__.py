"""Engines the benchmarks measure lora-ops against, kept as they were."""
