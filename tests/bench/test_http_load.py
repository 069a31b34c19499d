"""The HTTP driver against a real replica, and the vLLM comparison's commands.

A tiny-llama replica with two random adapters answers a handful of short streamed
requests; no timing is asserted, only that every figure was measured and every answer ran
to its length. The vLLM comparison needs a GPU and vLLM: only its dry run is checked here.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from common import write_random_adapters  # noqa: E402
from http_load import (  # noqa: E402
    Replica,
    closed_loop_http,
    lora_ops_replica,
    mixed_length_chats,
    supports_stream_options,
)
from workload import mixed_lengths, zipf_models  # noqa: E402

from lora_ops.lora import LoraSpec  # noqa: E402

ADAPTERS = ("customer-a", "customer-b")


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: root / name for name in ADAPTERS}
    spec = LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    write_random_adapters(tiny_base, list(folders.values()), spec)
    return folders


@pytest.fixture(scope="module")
def replica(
    tiny_base: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    log = tmp_path_factory.mktemp("replica") / "replica.log"
    with lora_ops_replica(tiny_base, adapters, log=log, startup_timeout_s=120) as running:
        yield running


def test_streamed_requests_are_timed_and_run_to_their_length(replica: Replica) -> None:
    models = zipf_models(ADAPTERS, 6, random.Random(0))
    requests = mixed_length_chats(models, seed=0, short=(3, 6), long=(10, 12))
    run = closed_loop_http(replica.url, requests, clients=3)
    assert run.failures == []
    assert [t.request_index for t in run.timings] == list(range(len(requests)))
    for timing in run.timings:
        request = requests[timing.request_index]
        assert 0 < timing.ttft <= timing.e2e
        assert timing.finish_reason == "length"
        assert timing.tokens == request.max_tokens  # ignore_eos: no answer ends early
        assert 1 <= timing.text_events <= request.max_tokens
    figures = run.figures()
    assert figures["requests"] == len(requests)
    assert figures["failed"] == 0
    assert figures["tokens_per_second"] > 0


def test_replica_declares_stream_options(replica: Replica) -> None:
    # A lora-ops replica streams the usage when asked, so the driver counts tokens from it.
    assert supports_stream_options(replica.url)


def test_chats_draw_the_lengths_of_the_in_process_workload() -> None:
    models = zipf_models([f"m{i}" for i in range(5)], 40, random.Random(3))
    chats = mixed_length_chats(models, seed=7)
    encoded = mixed_lengths(lambda messages: [len(messages)], models, seed=7)
    assert [c.max_tokens for c in chats] == [r.max_tokens for r in encoded]
    assert [c.model for c in chats] == models
    assert [[len(c.messages)] for c in chats] == [r.prompt_ids for r in encoded]


def test_vllm_compare_dry_run_prints_both_commands(tiny_base: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu" / "vllm_compare.py"),
            "--dry-run",
            "--base",
            str(tiny_base),
            "--adapters",
            "3",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    commands = [shlex.split(line) for line in done.stdout.splitlines() if " serve " in line]
    vllm = next(c for c in commands if "--enable-lora" in c)
    assert vllm[vllm.index("serve") + 1] == str(tiny_base)
    modules = vllm[vllm.index("--lora-modules") + 1 :]
    for index in range(3):
        name = f"customer-{index:02d}"
        assert f"{name}={tmp_path / 'adapters' / name}" in modules
    serve = next(c for c in commands if "lora_ops" in c)
    assert serve[serve.index("--base") + 1] == str(tiny_base)
    assert serve[serve.index("--adapter-root") + 1] == str(tmp_path / "adapters")
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
