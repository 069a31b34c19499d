"""Any causal LM: train, save in PEFT's format, merge, mix in a batch and serve, on tiny
random models of nine architectures (fused projections, GPT-2's transposed Conv1D)."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lora_ops import base_models
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.generation import GenerationRequest, SamplingParams, generate_batch
from lora_ops.lora import (
    LoraSpec,
    adapters_in_use,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)
from lora_ops.lora.slots import AdapterSlots
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from lora_ops.training.local import train_from_files
from tests.architectures import build_base
from tests.helpers import randomize_adapter, sample_input_ids

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj"}
# model_type -> (suffixes of the modules adapted by default, how many: 2 layers each)
DEFAULTS: dict[str, tuple[set[str], int]] = {
    "llama": (LLAMA_LIKE, 8),
    "qwen2": (LLAMA_LIKE, 8),
    "qwen3": (LLAMA_LIKE, 8),
    "mistral": (LLAMA_LIKE, 8),
    "gemma2": (LLAMA_LIKE, 8),
    "olmo2": (LLAMA_LIKE, 8),
    "phi3": ({"qkv_proj", "o_proj"}, 4),
    "gpt_neox": ({"query_key_value", "dense"}, 4),
    "gpt2": ({"c_attn", "c_proj"}, 4),  # attention's c_proj only, not the MLP's
}
ARCHITECTURES = list(DEFAULTS)
PARAMS = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def base_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each architecture's tiny base folder, built on first use."""
    root = tmp_path_factory.mktemp("bases")
    built: dict[str, Path] = {}

    def base(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_base(model_type, root / model_type)
        return built[model_type]

    return base


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    small = tmp_path_factory.mktemp("data") / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:24]))
    return small


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def random_adapter(model: PreTrainedModel, name: str, spec: LoraSpec, seed: int) -> None:
    apply_lora(model, spec, adapter=name)
    randomize_adapter(model, name, seed=seed, std=0.3)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_default_targets_are_the_attention_projections(
    base_of: Callable[[str], Path], model_type: str
) -> None:
    suffixes, count = DEFAULTS[model_type]
    spec = base_models.check_lora_fits(base_of(model_type), LoraSpec(r=4))
    model = base_models.load_model(base_of(model_type), "cpu")
    report = apply_lora(model, LoraSpec(r=4))
    assert {name.rsplit(".", 1)[-1] for name in report.modules} == suffixes
    assert len(report.modules) == count
    assert {t.rsplit(".", 1)[-1] for t in spec.target_modules} == suffixes
    conv1d = {layer.fan_in_fan_out for _, layer in lora_layers(model)}
    assert conv1d == {model_type == "gpt2"}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_trained_adapter_loads_in_peft_with_the_same_logits(
    base_of: Callable[[str], Path], data_file: Path, tmp_path: Path, model_type: str
) -> None:
    config = TrainConfig(
        lora=LoraSpec(r=4, alpha=8),
        learning_rate=2e-2,
        max_steps=3,
        batch_size=4,
        max_seq_len=256,
        eval_fraction=0.25,
    )
    result = train_from_files(base_of(model_type), data_file, config, tmp_path, progress=False)
    assert len(result.train_losses) == 3
    assert all(torch.isfinite(torch.tensor(result.train_losses)))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    suffixes, _ = DEFAULTS[model_type]
    assert {t.rsplit(".", 1)[-1] for t in saved["target_modules"]} == suffixes
    assert saved["fan_in_fan_out"] is (model_type == "gpt2")

    ours = base_models.load_model(base_of(model_type), "cpu")
    ids = sample_input_ids(ours.config.vocab_size)
    base_logits = logits(ours, ids)
    load_adapter(ours, tmp_path, "trained")
    with adapters_in_use(ours, "trained"):
        adapted = logits(ours, ids)
    assert (adapted - base_logits).abs().max() > 1e-3  # the steps moved B off zero
    peft_model = PeftModel.from_pretrained(
        base_models.load_model(base_of(model_type), "cpu"), tmp_path
    )
    torch.testing.assert_close(logits(peft_model, ids), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_saved_files_are_the_ones_peft_writes_and_peft_files_load(
    base_of: Callable[[str], Path], tmp_path: Path, model_type: str
) -> None:
    ours = base_models.load_model(base_of(model_type), "cpu")
    random_adapter(ours, "default", LoraSpec(r=4, alpha=8), seed=1)
    save_adapter(ours, tmp_path / "ours")
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # init_lora_weights=False: PEFT draws B at random too, so the logits below can differ.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=our_config["target_modules"], init_lora_weights=False
    )
    peft_model = get_peft_model(base_models.load_model(base_of(model_type), "cpu"), config)
    peft_model.save_pretrained(tmp_path / "peft")

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        tensors = load_file(folder / "adapter_model.safetensors")
        return {key: tuple(t.shape) for key, t in tensors.items()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert theirs["fan_in_fan_out"] is (model_type == "gpt2")
    assert our_config["fan_in_fan_out"] is theirs["fan_in_fan_out"]

    fresh = base_models.load_model(base_of(model_type), "cpu")
    load_adapter(fresh, tmp_path / "peft", "peft")
    ids = sample_input_ids(fresh.config.vocab_size)
    with adapters_in_use(fresh, "peft"):
        adapted = logits(fresh, ids)
    torch.testing.assert_close(adapted, logits(peft_model, ids))
    assert not torch.allclose(adapted, logits(fresh, ids), atol=1e-3)  # B is not zero


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_all_linear_adapts_what_peft_adapts(
    base_of: Callable[[str], Path], model_type: str
) -> None:
    ours = base_models.load_model(base_of(model_type), "cpu")
    report = apply_lora(ours, LoraSpec(r=2, target_modules=("all-linear",)))
    config = LoraConfig(r=2, target_modules="all-linear")
    peft_model = get_peft_model(base_models.load_model(base_of(model_type), "cpu"), config)
    theirs = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }
    assert set(report.modules) == theirs
    assert not any(name.endswith("lm_head") for name in report.modules)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_merged_adapter_gives_the_unmerged_logits(
    base_of: Callable[[str], Path], model_type: str
) -> None:
    model = base_models.load_model(base_of(model_type), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = sample_input_ids(model.config.vocab_size)
    random_adapter(model, "acme", LoraSpec(r=4, alpha=8), seed=2)
    with adapters_in_use(model, "acme"):
        unmerged = logits(model, ids)
    merge_adapter(model, "acme")
    merged = logits(model, ids)
    unmerge_adapter(model, "acme")
    set_adapter(model, None)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    for key, weight in model.state_dict().items():
        if "lora_" not in key:
            torch.testing.assert_close(weight, before[key.replace(".base_layer", "")])


def adapted_model(base: Path) -> PreTrainedModel:
    """The base with acme (default targets, r=4) and globex (all-linear, r=2)."""
    model = base_models.load_model(base, "cpu")
    random_adapter(model, "acme", LoraSpec(r=4, alpha=8), seed=3)
    random_adapter(model, "globex", LoraSpec(r=2, alpha=4, target_modules=("all-linear",)), 4)
    return model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_mixed_batch_rows_equal_each_row_alone(
    base_of: Callable[[str], Path], model_type: str
) -> None:
    model = adapted_model(base_of(model_type))
    ids = sample_input_ids(model.config.vocab_size, batch=3)
    per_row = ["acme", None, "globex"]
    alone = []
    for row, adapter in enumerate(per_row):
        with adapters_in_use(model, adapter):
            alone.append(logits(model, ids[row : row + 1]))
    assert not torch.allclose(alone[0], logits(model, ids[:1]), atol=1e-3)
    with adapters_in_use(model, per_row):
        by_rows = logits(model, ids)
    slots = AdapterSlots(model, num_slots=4, dtype=torch.float32)
    for slot, adapter in enumerate([*per_row, "acme"]):
        slots.fill(slot, adapter)
    slots.route([2, 1, 3])  # out of order: the gathered path
    by_slots = logits(model, ids[[2, 1, 0]])
    slots.clear_route()
    for row in range(3):
        torch.testing.assert_close(by_rows[row : row + 1], alone[row], rtol=1e-4, atol=1e-4)
    for row, source in enumerate([2, 1, 0]):
        torch.testing.assert_close(by_slots[row : row + 1], alone[source], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_replica_serves_the_adapters_in_one_batch(
    base_of: Callable[[str], Path], tmp_path: Path, model_type: str
) -> None:
    base = base_of(model_type)
    model = adapted_model(base)
    for name in ("acme", "globex"):
        save_adapter(model, tmp_path / name, adapter=name)
    engine = Engine(EngineConfig(base, max_adapters=4))
    try:
        for name in ("acme", "globex"):
            engine.load_adapter(name, AdapterSource(str(tmp_path / name)))
        prompt = engine.encode_chat([{"role": "user", "content": "How much is the Pro Anvil?"}])
        names = ["acme", "base", "globex", "acme"]
        futures = [engine.submit(prompt, name, PARAMS) for name in names]
        wait(futures, timeout=120)
        replies = [future.result().text for future in futures]
    finally:
        engine.close()
    tokenizer = base_models.load_tokenizer(base)
    for name, reply in zip(names, replies, strict=True):
        adapter = None if name == "base" else name
        request = GenerationRequest(prompt, adapter, PARAMS)
        assert reply == generate_batch(model, tokenizer, [request])[0].text, name
    assert len(set(replies[:3])) == 3  # each adapter really changes the reply


def test_targets_that_match_nothing_are_refused_naming_the_layers(
    base_of: Callable[[str], Path],
) -> None:
    explicit = LoraSpec(r=4, target_modules=("q_proj", "v_proj"))
    with pytest.raises(InputError, match=r"'q_proj' matches no module.*gpt2.*c_attn, c_fc, c_proj"):
        base_models.check_lora_fits(base_of("gpt2"), explicit)
    model = base_models.load_model(base_of("phi3"), "cpu")
    with pytest.raises(InputError, match=r"'q_proj' matches no module.*phi3.*qkv_proj"):
        apply_lora(model, explicit)
    assert not list(lora_layers(model))


def test_gpt2_adapter_that_says_its_layers_are_not_transposed_is_refused(
    base_of: Callable[[str], Path], tmp_path: Path
) -> None:
    model = base_models.load_model(base_of("gpt2"), "cpu")
    random_adapter(model, "default", LoraSpec(r=4), seed=5)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"fan_in_fan_out": False}))
    fresh = base_models.load_model(base_of("gpt2"), "cpu")
    with pytest.raises(InputError, match=r"false, but transformer\.h\.0\.attn\.c_attn is a Conv1D"):
        load_adapter(fresh, tmp_path)
    assert not list(lora_layers(fresh))


@pytest.mark.parametrize(
    ("model_type", "named"),
    [("llama", ("q_proj", "k_proj", "v_proj", "o_proj")), ("gpt2", ("c_attn", "attn.c_proj"))],
)
def test_a_run_without_targets_has_the_key_of_one_naming_the_defaults(
    base_of: Callable[[str], Path], model_type: str, named: tuple[str, ...]
) -> None:
    from lora_ops import pipeline

    sha = "0" * 64
    dataset = pipeline.DatasetRef(
        "acme", sha, "s3://b/d/", "s3://b/d/p", str(base_of(model_type)), 8, 2
    )
    default_key, _ = pipeline.run_key(dataset, TrainConfig())
    named_key, _ = pipeline.run_key(dataset, TrainConfig(lora=LoraSpec(target_modules=named)))
    other_key, _ = pipeline.run_key(dataset, TrainConfig(lora=LoraSpec(target_modules=named[:1])))
    assert default_key == named_key != other_key
