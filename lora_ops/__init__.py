"""lora-ops: one LoRA adapter per customer on a shared base language model."""

__version__ = "0.1.0"
