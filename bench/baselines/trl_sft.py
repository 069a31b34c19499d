"""TRL's SFTTrainer with a PEFT LoraConfig, as a user would run it instead of `lora-ops train`.

A whole process, started by bench/train_vs_trl.py the way `lora-ops train` is: it loads the
base and the data, trains, writes the adapter (PEFT's format) and prints one JSON line of
what its trainer measured. Loss is on the assistant's reply only: each chat example becomes
TRL's conversational prompt-completion form (every turn up to the last assistant message is
the prompt), for which SFTTrainer's default ``completion_only_loss`` masks the prompt.
SmolLM2's chat template has no ``{% generation %}`` markers, so ``assistant_only_loss``
cannot be used on it.

Where TRL's defaults differ from lora-ops', they are set to lora-ops' so both run the same
training: gradient checkpointing off (SFTConfig turns it on), bf16 autocast only on CUDA
(SFTConfig turns it on everywhere; lora-ops trains in fp32 on CPU), a cosine schedule with
the same warmup steps, AdamW from torch, clipping at 1.0, no weight decay, no dropout.

    python bench/baselines/trl_sft.py --base smollm2-135m-instruct --data train.jsonl \
        --out /tmp/trl-adapter --steps 30 --batch 8 --lr 2e-3 --rank 16
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lora_ops import base_models

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def prompt_completion(line: str) -> dict[str, Any]:
    """A chat example as TRL's prompt-completion pair: the last assistant turn is learned."""
    messages = json.loads(line)["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": messages[last : last + 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    folder = base_models.resolve_base(args.base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = base_models.load_model(folder, device)
    tokenizer = base_models.load_tokenizer(folder)
    lines = args.data.read_text().splitlines()
    dataset = Dataset.from_list([prompt_completion(line) for line in lines if line.strip()])
    config = SFTConfig(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(args.warmup_ratio * args.steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=args.seed,
        max_length=args.max_seq_len,
        gradient_checkpointing=False,
        bf16=device.type == "cuda",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    timing = _StepTiming()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timing],
    )
    result = trainer.train()
    trainer.save_model(str(args.out))
    tokens = max((entry.get("num_tokens", 0) for entry in trainer.state.log_history), default=0)
    print(  # noqa: T201 - the one line bench/train_vs_trl.py reads
        json.dumps(
            {
                "steps": result.global_step,
                "train_seconds": timing.seconds(),
                "tokens": tokens,
                "tokens_per_second": tokens / timing.seconds(),
                "train_loss": result.training_loss,
                "process_seconds_in_python": time.perf_counter() - started,
            }
        ),
        flush=True,
    )


class _StepTiming(TrainerCallback):
    """When the first step began and the last one ended (the trainer's own loop only)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.last = time.perf_counter()

    def seconds(self) -> float:
        if self.first is None or self.last is None:
            raise RuntimeError("the trainer ran no step")
        return self.last - self.first


if __name__ == "__main__":
    main()
