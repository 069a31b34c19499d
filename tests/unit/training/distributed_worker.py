"""One rank of the data-parallel tests, started by ``torchrun`` (``test_distributed``).

In one process group it trains the uninterrupted run, then resumes a second run from that
run's first checkpoint, and writes what this rank did (hook calls, files saved, the data
set it trained from) to
``<work>/rank-<rank>.json`` for the test to read.

    torchrun --nproc-per-node 2 -m tests.unit.training.distributed_worker WORK TRAIN HELD_OUT
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from lora_ops.config import TrainConfig
from lora_ops.data.arrow_store import ArrowPrepared
from lora_ops.lora import LoraSpec
from lora_ops.training import checkpoints, distributed, loop
from lora_ops.training.local import DataReport, train_from_files
from lora_ops.training.loop import EvalMetrics, StepMetrics, TrainingHooks

# 3 a micro-batch on 2 ranks: shares of 2 and 1, and an epoch of 16 examples ends on a
# micro-batch of 1, where rank 1's share is empty. The flags say the same to the CLI.
EXACT_FLAGS = [
    "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "5e-3", "--max-steps", "4",
    "--batch-size", "3", "--grad-accum", "2", "--seed", "7", "--checkpoint-every", "2",
    "--eval-every", "2",
]  # fmt: skip
EXACT_CONFIG = TrainConfig(
    lora=LoraSpec(r=4, alpha=8, dropout=0.0),
    learning_rate=5e-3,
    max_steps=4,
    batch_size=3,
    grad_accum=2,
    seed=7,
    checkpoint_every=2,
    eval_every=2,
)
# With dropout each rank draws its own masks: a resume must give each rank its own back.
DROPOUT_CONFIG = EXACT_CONFIG.model_copy(update={"lora": LoraSpec(r=4, alpha=8, dropout=0.1)})
RESUME_FROM = 2


class Recorder(TrainingHooks):
    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def on_step(self, metrics: StepMetrics) -> None:
        self.calls.append(["step", metrics.step, metrics.loss])

    def on_checkpoint(self, folder: Path, step: int) -> None:
        self.calls.append(["checkpoint", step])

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        self.calls.append(["evaluation", metrics.step, metrics.loss])


def record_saves(saved: list[str]) -> None:
    """Note every adapter and checkpoint this rank writes."""
    save_adapter, save_checkpoint = loop.save_adapter, checkpoints.save

    def adapter(model: Any, folder: Path, **kwargs: Any) -> Any:
        saved.append(f"adapter {folder.name}")
        return save_adapter(model, folder, **kwargs)

    def checkpoint(folder: Path, step: int, *args: Any) -> Path:
        saved.append(f"checkpoint {step}")
        return save_checkpoint(folder, step, *args)

    loop.save_adapter = adapter  # type: ignore[assignment]
    checkpoints.save = checkpoint  # type: ignore[assignment]


def note_data(seen: list[list[Any]]) -> DataReport:
    """Note the prepared set a run trains from: its folder and whether it was cached."""

    def note(dataset: ArrowPrepared) -> None:
        seen.append([str(dataset.folder), dataset.cache_hit])

    return note


def main(work: Path, train: Path, held_out: Path) -> None:
    saved: list[str] = []
    record_saves(saved)
    whole, resumed = Recorder(), Recorder()
    data: dict[str, list[list[Any]]] = {"whole": [], "resumed": []}
    cache = work / "datasets"
    with distributed.process_group():
        whole_result = train_from_files(
            "tiny-llama",
            train,
            DROPOUT_CONFIG,
            work / "whole",
            hooks=whole,
            progress=False,
            validation_path=held_out,
            data_cache=cache,
            on_data=note_data(data["whole"]),
        )
        if distributed.is_main():  # the state an interrupted run would have left
            first = work / "whole" / "checkpoints" / f"step-{RESUME_FROM}"
            shutil.copytree(first, work / "resumed" / "checkpoints" / first.name)
        distributed.barrier()
        resumed_result = train_from_files(
            "tiny-llama",
            train,
            DROPOUT_CONFIG,
            work / "resumed",
            hooks=resumed,
            resume=True,
            progress=False,
            validation_path=held_out,
            data_cache=cache,
            on_data=note_data(data["resumed"]),
        )
        rank = distributed.rank()
    report = {
        "hooks": {"whole": whole.calls, "resumed": resumed.calls},
        "saved": saved,
        "data": data,
        "results": {"whole": whole_result.to_json(), "resumed": resumed_result.to_json()},
    }
    (work / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
