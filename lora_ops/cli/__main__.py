"""``python -m lora_ops.cli``: what ``torchrun -m lora_ops.cli train ...`` runs in each process."""

from lora_ops.cli import main

main()
