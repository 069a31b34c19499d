"""The serving engine on tiny-llama: mixed-adapter batches, the LRU cache, refused adapters."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import pytest

from lora_ops import base_models
from lora_ops.errors import InputError
from lora_ops.files import sha256_file
from lora_ops.generation import GenerationRequest, SamplingParams, generate_batch
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig, UnknownModel
from tests.helpers import randomize_adapter

CUSTOMERS = ["acme", "globex", "initech", "hooli", "umbrella"]
PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, name in enumerate(CUSTOMERS):
        model = base_models.load_model(tiny_base, "cpu")
        apply_lora(model, LoraSpec(r=4, alpha=8), adapter=name)
        randomize_adapter(model, name, seed=seed, std=0.3)
        dirs[name] = save_adapter(
            model, root / name, adapter=name, base_model_name_or_path="tiny-llama"
        )
    return dirs


@pytest.fixture
def engine(tiny_base: Path) -> Iterator[Engine]:
    served = Engine(EngineConfig(tiny_base, max_adapters=8))
    yield served
    served.close()


def expected_reply(tiny_base: Path, adapter_dir: Path | None, prompt: list[int]) -> str:
    """The same request decoded alone on a fresh model: the reference."""
    model = base_models.load_model(tiny_base, "cpu")
    tokenizer = base_models.load_tokenizer(tiny_base)
    name = None
    if adapter_dir is not None:
        from lora_ops.lora import load_adapter

        name = "x"
        load_adapter(model, adapter_dir, name)
    return generate_batch(model, tokenizer, [GenerationRequest(prompt, name, PARAMS)])[0].text


def test_mixed_requests_share_a_batch_and_match_each_alone(
    engine: Engine, adapter_dirs: dict[str, Path], tiny_base: Path
) -> None:
    for name in CUSTOMERS[:3]:
        engine.load_adapter(name, AdapterSource(str(adapter_dirs[name])))
    prompt = engine.encode_chat([{"role": "user", "content": "How much is the Pro Anvil?"}])
    models = ["acme", "base", "globex", "initech", "acme"]
    futures = [engine.submit(prompt, m, PARAMS) for m in models]
    wait(futures, timeout=60)
    replies = [f.result().text for f in futures]
    assert max(engine.stats.batch_sizes) >= 3
    for model, reply in zip(models, replies, strict=True):
        adapter = None if model == "base" else adapter_dirs[model]
        assert reply == expected_reply(tiny_base, adapter, prompt), model
    assert len(set(replies[:4])) == 4  # each customer's adapter really differs


def test_small_cache_evicts_and_reloads(adapter_dirs: dict[str, Path], tiny_base: Path) -> None:
    engine = Engine(EngineConfig(tiny_base, max_adapters=2))
    try:
        for name in CUSTOMERS:
            engine.load_adapter(name, AdapterSource(str(adapter_dirs[name])))
        prompt = engine.encode_text("Hello there")
        for _ in range(2):
            futures = {name: engine.submit(prompt, name, PARAMS) for name in CUSTOMERS}
            for name, future in futures.items():
                assert future.result(timeout=60).text == expected_reply(
                    tiny_base, adapter_dirs[name], prompt
                )
        assert len(engine.resident_adapters()) <= 2
        assert engine.stats.evictions >= 3
        assert engine.stats.cache_misses >= 5
    finally:
        engine.close()


def test_tampered_and_pickled_adapters_are_refused_and_serving_goes_on(
    engine: Engine, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    good = adapter_dirs["acme"]
    expected = sha256_file(good / "adapter_model.safetensors")
    engine.load_adapter("acme", AdapterSource(str(good), expected))
    with pytest.raises(InputError, match="does not match the sha256"):
        engine.load_adapter("globex", AdapterSource(str(adapter_dirs["globex"]), expected))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(InputError, match="pickle file and is never loaded"):
        engine.load_adapter("hooli", AdapterSource(str(pickled)))
    assert engine.models() == ["base", "acme"]
    prompt = engine.encode_text("Hi")
    assert engine.submit(prompt, "acme", PARAMS).result(timeout=60).finish_reason in {
        "stop",
        "length",
    }


def test_unknown_model_and_bad_names_are_refused(engine: Engine) -> None:
    with pytest.raises(UnknownModel, match="'nobody' does not exist"):
        engine.submit([1, 2, 3], "nobody")
    with pytest.raises(InputError, match="not a customer id"):
        engine.load_adapter("../etc", AdapterSource("/tmp"))
    with pytest.raises(InputError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_seeded_sampling_repeats_and_stop_strings_cut(engine: Engine) -> None:
    prompt = engine.encode_text("Once upon a time")
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    first = engine.submit(prompt, "base", sampled).result(timeout=60)
    second = engine.submit(prompt, "base", sampled).result(timeout=60)
    assert first.text == second.text
    greedy = engine.submit(prompt, "base", SamplingParams(max_tokens=10)).result(timeout=60)
    if len(greedy.text) > 3:
        stop = greedy.text[2:4]
        cut = engine.submit(prompt, "base", SamplingParams(max_tokens=10, stop=(stop,)))
        result = cut.result(timeout=60)
        assert result.text == greedy.text[: greedy.text.find(stop)]
        assert result.finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens(tiny_base: Path) -> None:
    model = base_models.load_model(tiny_base, "cpu")
    tokenizer = base_models.load_tokenizer(tiny_base)
    prompt = [1, 2, 3]
    first = generate_batch(model, tokenizer, [GenerationRequest(prompt, None, PARAMS)])[0]
    # Make the token greedy decoding picks first an end of turn, then ask again.
    model.generation_config.eos_token_id = [first.token_ids[0]]
    stopped, kept = generate_batch(
        model,
        tokenizer,
        [
            GenerationRequest(prompt, None, PARAMS),
            GenerationRequest(prompt, None, SamplingParams(max_tokens=8, ignore_eos=True)),
        ],
    )
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", [])
    assert kept.finish_reason == "length"
    assert kept.token_ids == first.token_ids
