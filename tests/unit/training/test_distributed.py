"""Data-parallel training under torchrun, on CPUs: two gloo processes train the adapter one
process trains at the same global batch, resume exactly, and only rank 0 writes and reports.

Each test starts ``torchrun --nproc-per-node 2`` once; the single-process runs happen here.
Rank 0 prepares the data into the cache while rank 1 waits; rank 1 then reads that entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_ops.data.arrow_store import ArrowPrepared
from lora_ops.training import checkpoints, distributed
from lora_ops.training.local import train_from_files
from tests.servers import free_ports
from tests.unit.training.distributed_worker import EXACT_CONFIG, EXACT_FLAGS, RESUME_FROM

ROOT = Path(__file__).parents[3]
SAMPLE = ROOT / "examples" / "acme-support.jsonl"
WEIGHTS = "adapter_model.safetensors"
# Two ranks sum their shares where one process sums the whole batch: the same terms in
# another order (and padded to another length), so equal up to float rounding.
ATOL = 1e-5


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 training examples and 10 held-out ones (4 held-out batches of 3, 2 a rank)."""
    lines = SAMPLE.read_text().splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("data")
    train, held_out = folder / "train.jsonl", folder / "held-out.jsonl"
    train.write_text("".join(lines[:16]))
    held_out.write_text("".join(lines[16:26]))
    return train, held_out


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 ARGS`` from the repository root."""
    (port,) = free_ports(1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 ARGS``; it must succeed."""
    done = launch(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_two_processes_train_what_one_trains_at_the_same_global_batch(
    data_files: tuple[Path, Path], tiny_base: Path, tmp_path: Path
) -> None:
    train, held_out = data_files
    two, cache = tmp_path / "two", tmp_path / "datasets"
    done = torchrun(
        "-m", "lora_ops.cli", "train", "--base", "tiny-llama", "--data", str(train),
        "--validation-data", str(held_out), "--out", str(two), "--data-cache", str(cache),
        *EXACT_FLAGS,
    )  # fmt: skip
    seen: list[ArrowPrepared] = []
    one = train_from_files(
        "tiny-llama", train, EXACT_CONFIG, tmp_path / "one", progress=False,
        validation_path=held_out, data_cache=cache, on_data=seen.append,
    )  # fmt: skip
    # Rank 0 prepared the set, rank 1 and the single process found it: one entry.
    (entry,) = cache.iterdir()
    assert f"data prepared     16 train, 10 eval examples into {entry}" in done.stdout
    assert [(dataset.folder, dataset.cache_hit) for dataset in seen] == [(entry, True)]
    summary = json.loads((two / "training_summary.json").read_text())
    assert summary["train_losses"] == pytest.approx(one.train_losses, abs=ATOL)
    assert [step for step, _ in summary["evaluations"]] == [2, 4]
    assert [loss for _, loss in summary["evaluations"]] == pytest.approx(
        [loss for _, loss in one.evaluations], abs=ATOL
    )
    assert summary["best_step"] == one.best_step
    assert summary["eval_loss"] == pytest.approx(one.eval_loss, abs=ATOL)
    two_weights, one_weights = load_file(two / WEIGHTS), load_file(tmp_path / "one" / WEIGHTS)
    difference = largest_difference(two_weights, one_weights)
    print(f"largest weight difference, two processes vs one: {difference:.2e}")
    assert difference <= ATOL
    # Rank 1 prints nothing: one report, and the adapter folder as the last line.
    assert done.stdout.count("adapted eval loss") == 1, done.stdout
    assert done.stdout.strip().splitlines()[-1] == str(two)


def test_a_resumed_two_process_run_ends_where_the_uninterrupted_one_does(
    data_files: tuple[Path, Path], tiny_base: Path, tmp_path: Path
) -> None:
    torchrun("-m", "tests.unit.training.distributed_worker", str(tmp_path), *map(str, data_files))
    main, other = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    # Rank 0 prepared the data while rank 1 waited, then rank 1 read rank 0's entry.
    (entry,) = (tmp_path / "datasets").iterdir()
    assert main["data"] == {"whole": [[str(entry), False]], "resumed": [[str(entry), True]]}
    assert other["data"] == {"whole": [[str(entry), True]], "resumed": [[str(entry), True]]}
    whole, resumed = (load_file(tmp_path / run / WEIGHTS) for run in ("whole", "resumed"))
    difference = largest_difference(whole, resumed)
    print(f"largest weight difference, resumed vs uninterrupted: {difference:.2e}")
    assert difference <= 1e-6
    steps = [call for call in main["hooks"]["whole"] if call[0] == "step"]
    assert [step for _, step, _ in steps] == [1, 2, 3, 4]
    resumed_steps = [call for call in main["hooks"]["resumed"] if call[0] == "step"]
    assert [step for _, step, _ in resumed_steps] == [3, 4]
    resumed_losses = [loss for _, _, loss in resumed_steps]
    assert resumed_losses == pytest.approx([loss for _, _, loss in steps[RESUME_FROM:]], abs=1e-6)
    assert main["results"]["resumed"]["resumed_from_step"] == RESUME_FROM
    # Only rank 0 wrote and reported; every rank took the same decisions on the same figures.
    assert ["checkpoint", 2] in main["hooks"]["whole"]
    assert main["saved"] == ["checkpoint 2", "adapter whole", "adapter resumed"]
    assert other["hooks"] == {"whole": [], "resumed": []}
    assert other["saved"] == []
    for run in ("whole", "resumed"):
        for figure in ("train_losses", "evaluations", "best_step", "eval_loss"):
            assert other["results"][run][figure] == main["results"][run][figure]


def test_bad_data_under_torchrun_is_refused_by_line_on_every_rank(
    data_files: tuple[Path, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """Rank 0 finds the bad line; rank 1, waiting on it, checks the file and finds it too,
    rather than wait on a rank that is gone. No entry is written."""
    lines = data_files[0].read_text().splitlines()
    lines[5] = '{"messages": [{"role": "user"'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cache, out = tmp_path / "datasets", tmp_path / "adapter"

    done = launch(
        "-m", "lora_ops.cli", "train", "--base", "tiny-llama", "--data", str(bad),
        "--out", str(out), "--data-cache", str(cache), *EXACT_FLAGS,
    )  # fmt: skip

    assert done.returncode != 0
    assert f"{bad}:6: not valid JSON" in done.stderr
    assert "RuntimeError" not in done.stderr, done.stderr  # no rank broke on a dead barrier
    assert list(cache.iterdir()) == []
    assert not out.exists()


def test_one_process_needs_no_process_group() -> None:
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.share([4, 5, 6]) == [4, 5, 6]
    assert (distributed.sum_count(3), distributed.sum_value(0.5)) == (3, 0.5)
    with distributed.process_group():  # WORLD_SIZE unset: nothing to join
        assert not distributed.is_distributed()


def test_each_rank_resumes_its_own_random_numbers(tiny_model: Any, tmp_path: Path) -> None:
    """A checkpoint of two ranks gives rank 1 the generator state rank 1 saved."""
    from lora_ops.lora import LoraSpec, apply_lora

    apply_lora(tiny_model, LoraSpec(r=2, alpha=4))
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
    torch.manual_seed(1)
    rank0 = checkpoints.rng_state()
    torch.manual_seed(2)
    rank1 = checkpoints.rng_state()
    saved = checkpoints.save(tmp_path, 5, tiny_model, optimizer, "f", rank_rng=[rank0, rank1])
    torch.manual_seed(3)
    assert checkpoints.restore(saved, tiny_model, optimizer, "f", rank=1) == 5
    assert torch.equal(torch.random.get_rng_state(), rank1["torch_rng"])
    checkpoints.restore(saved, tiny_model, optimizer, "f", rank=0)
    assert torch.equal(torch.random.get_rng_state(), rank0["torch_rng"])
