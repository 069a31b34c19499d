"""Where an engine takes adapters from, and what it serves after an eviction."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_ops.errors import InputError
from lora_ops.files import sha256_file
from lora_ops.generation import SamplingParams
from lora_ops.lora.peft_format import read_adapter_tensors
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig, UnknownModel
from lora_ops.serving.sources import SourcePolicy, SourceUnavailable
from tests.serving.replicas import make_adapters

PARAMS = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module")
def made(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_base, tmp_path_factory.mktemp("made"), ["acme", "globex"])


@pytest.fixture
def root(made: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh adapter root holding copies of the adapters, free to change per test."""
    for name, folder in made.items():
        shutil.copytree(folder, tmp_path / "root" / name)
    return tmp_path / "root"


@pytest.fixture
def engine(tiny_base: Path, root: Path) -> Iterator[Engine]:
    served = Engine(EngineConfig(tiny_base, max_adapters=1, adapter_roots=[root]))
    yield served
    served.close()


POLICY_CASES = [
    ("s3://lora-ops/checkpoints/acme/run/step-1", "acme", None),
    ("s3://another-bucket/acme", "acme", "only the bucket 'lora-ops'"),
    ("s3://lora-ops/../secrets", "acme", "'..' are not allowed"),
    ("models:/adapter-acme/3", "acme", None),
    ("models:/adapter-acme@production", "acme", None),
    ("models:/adapter-acme/3", "globex", "belongs to customer 'acme'"),
    ("models:/adapter-acme@production", "globex", "cannot be served as 'globex'"),
    ("models:/m-0123456789abcdef", "acme", "expected models:/adapter-<customer>"),
    ("models:/adapter-acme/3/../../x", "acme", "expected models:/adapter-<customer>"),
]


@pytest.mark.parametrize(
    ("uri", "name", "refusal"),
    POLICY_CASES,
    ids=[
        "own-bucket",
        "other-bucket",
        "dotdot-key",
        "own-version",
        "own-alias",
        "other-customers-version",
        "other-customers-alias",
        "logged-model-id",
        "version-with-tail",
    ],
)
def test_remote_sources_are_checked_before_any_download(
    uri: str, name: str, refusal: str | None
) -> None:
    policy = SourcePolicy([], "lora-ops")
    if refusal is None:
        policy.check(name, uri)
    else:
        with pytest.raises(InputError, match=refusal):
            policy.check(name, uri)


def test_local_folders_must_lie_inside_a_root(engine: Engine, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(root / "acme", outside)
    for path in (outside, root / ".." / "outside", root.parent):
        with pytest.raises(InputError, match="outside the adapter roots"):
            engine.load_adapter("acme", AdapterSource(str(path)))
    engine.load_adapter("acme", AdapterSource(str(root / "acme")))
    assert engine.models() == ["base", "acme"]


def test_symlinks_out_of_the_root_are_refused(engine: Engine, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(root / "acme", outside)
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="linked-folder: outside the adapter roots"):
        engine.load_adapter("acme", AdapterSource(str(root / "linked-folder")))
    inner = root / "linked-weights"
    inner.mkdir()
    shutil.copy(root / "acme" / "adapter_config.json", inner)
    (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(InputError, match="adapter_model.safetensors: outside the adapter roots"):
        engine.load_adapter("acme", AdapterSource(str(inner)))
    assert engine.models() == ["base"]


def test_no_roots_means_no_local_folders(tiny_base: Path, root: Path) -> None:
    engine = Engine(EngineConfig(tiny_base, adapter_roots=[]))
    try:
        with pytest.raises(InputError, match="--adapter-root"):
            engine.load_adapter("acme", AdapterSource(str(root / "acme")))
    finally:
        engine.close()


def test_a_reload_after_eviction_verifies_the_given_sha256(engine: Engine, root: Path) -> None:
    weights = root / "acme" / "adapter_model.safetensors"
    engine.load_adapter("acme", AdapterSource(str(root / "acme"), sha256_file(weights)))
    engine.load_adapter("globex", AdapterSource(str(root / "globex")))  # evicts acme
    assert engine.resident_adapters() == ["globex"]
    shutil.copy(root / "globex" / "adapter_model.safetensors", weights)  # changed on disk
    asked = engine.submit(engine.encode_text("Hi"), "acme", PARAMS)
    with pytest.raises(SourceUnavailable, match="'acme' cannot be served right now"):
        asked.result(timeout=60)
    assert engine.resident_adapters() == ["globex"]  # verified before anything was evicted


def test_without_a_sha256_the_first_load_is_pinned(
    engine: Engine, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine.load_adapter("acme", AdapterSource(str(root / "acme")))
    engine.load_adapter("globex", AdapterSource(str(root / "globex")))  # evicts acme
    shutil.copy(
        root / "globex" / "adapter_model.safetensors", root / "acme" / "adapter_model.safetensors"
    )
    asked = engine.submit(engine.encode_text("Hi"), "acme", PARAMS)
    with pytest.raises(SourceUnavailable):
        asked.result(timeout=60)
    assert "does not match the sha256" in caplog.text  # the cause, for the operator


def test_a_failed_reload_fails_only_its_own_requests(
    tiny_base: Path, root: Path, made: dict[str, Path]
) -> None:
    engine = Engine(EngineConfig(tiny_base, max_adapters=1, adapter_roots=[root]))
    try:
        engine.load_adapter("acme", AdapterSource(str(root / "acme")))
        engine.load_adapter("globex", AdapterSource(str(root / "globex")))  # evicts acme
        (root / "acme" / "adapter_model.safetensors").write_bytes(b"changed")
        prompt = engine.encode_text("Hi")
        futures = {m: engine.submit(prompt, m, PARAMS) for m in ("acme", "globex", "base")}
        with pytest.raises(SourceUnavailable):
            futures["acme"].result(timeout=60)
        assert futures["globex"].result(timeout=60).finish_reason in {"stop", "length"}
        assert futures["base"].result(timeout=60).finish_reason in {"stop", "length"}
    finally:
        engine.close()


def test_unloading_while_requests_wait_answers_them_not_found(tiny_base: Path, root: Path) -> None:
    engine = Engine(EngineConfig(tiny_base, max_batch_size=1, adapter_roots=[root]))
    gate, holding = threading.Event(), threading.Event()

    def hold(_: int, __: str) -> None:  # runs on the engine's thread, outside its locks
        holding.set()
        gate.wait(timeout=60)

    try:
        engine.load_adapter("acme", AdapterSource(str(root / "acme")))
        prompt = engine.encode_text("Hi")
        long = SamplingParams(max_tokens=4, ignore_eos=True)
        running = engine.submit(prompt, "base", long, on_text=hold)  # holds the one row
        assert holding.wait(timeout=60)
        waiting = engine.submit(prompt, "acme", PARAMS)  # no room: it waits
        engine.unload_adapter("acme")
        gate.set()
        with pytest.raises(UnknownModel, match="'acme' does not exist"):
            waiting.result(timeout=60)
        assert running.result(timeout=60).finish_reason == "length"
    finally:
        gate.set()
        engine.close()


def test_an_empty_prompt_is_refused_before_it_can_join_a_batch(engine: Engine) -> None:
    with pytest.raises(InputError, match="no tokens"):
        engine.submit([], "base", PARAMS)
    with pytest.raises(InputError, match="maximum context length is 2048"):
        engine.submit([1] * 2040, "base", SamplingParams(max_tokens=9))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_reading_adapter_weights_again_and_again_keeps_memory_flat(root: Path) -> None:
    # A replica with a small cache reads adapters back all day. safetensors' file loader
    # kept ~1 KB per call (~3 MB over these reads); reading from bytes keeps nothing.
    def read(times: int) -> None:
        for _ in range(times):
            read_adapter_tensors(root / "acme")

    read(200)  # allocator pools settle first
    before = rss_mb()
    read(3000)
    assert rss_mb() - before < 0.5
