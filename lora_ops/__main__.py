"""``python -m lora_ops``: the lora-ops command, for processes that must run this installation."""

from lora_ops.cli import main

main()
