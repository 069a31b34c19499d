"""Memory for bigger bases: gradient checkpointing, the base's dtype, a 4-bit NF4 base."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import base_models, data
from lora_ops.adapters import load_adapted, merge_to_folder
from lora_ops.config import TrainConfig
from lora_ops.customers import CustomerSpec, retrain_parameters
from lora_ops.errors import InputError
from lora_ops.generation import generate_reply
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora, lora_layers, merge_adapter
from lora_ops.training.batching import collate, summed_nll
from lora_ops.training.loop import StepMetrics, TrainingHooks, TrainingJob, train_adapter
from lora_ops.training.memory import (
    base_dtype_for,
    gradient_checkpointing,
    is_checkpointing,
    load_training_base,
)
from tests.helpers import randomize_adapter

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"
CPU = torch.device("cpu")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs lora-ops[qlora]"
)


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory):
    small = tmp_path_factory.mktemp("data") / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:30]))
    return data.prepare_dataset(small, tiny_tokenizer, max_seq_len=256, eval_fraction=0.2)


def config(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "lora": LoraSpec(r=4, alpha=8, dropout=0.1),
        "learning_rate": 1e-2,
        "max_steps": 3,
        "batch_size": 4,
        "seed": 5,
    }
    return TrainConfig(**{**settings, **overrides})


class Watch(TrainingHooks):
    """Records whether the model checkpointed activations while it trained."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.checkpointing: list[bool] = []

    def on_step(self, metrics: StepMetrics) -> None:
        self.checkpointing.append(is_checkpointing(self.model))


def train(
    model: PreTrainedModel, dataset: data.PreparedDataset, out: Path, cfg: TrainConfig
) -> tuple[list[float], list[bool]]:
    watch = Watch(model)
    job = TrainingJob(
        model, dataset.train, dataset.eval, cfg, out, pad_id=0, progress=False, hooks=watch
    )
    return train_adapter(job).train_losses, watch.checkpointing


def test_gradients_with_checkpointing_equal_those_without(
    tiny_model: PreTrainedModel, dataset: data.PreparedDataset
) -> None:
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8, dropout=0.1))
    randomize_adapter(tiny_model, "default")  # B != 0: A gets a gradient too
    batch = collate(dataset.train[:4], 0, CPU)
    tiny_model.train()

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays them
        with (
            gradient_checkpointing(tiny_model, checkpointing),
            adapters_in_use(tiny_model, "default"),
        ):
            assert is_checkpointing(tiny_model) == checkpointing
            loss = summed_nll(tiny_model, batch)
            loss.backward()
        return loss.detach(), [p.grad for p in tiny_model.parameters() if p.requires_grad]

    plain_loss, plain = loss_and_grads(False)
    checkpointed_loss, checkpointed = loss_and_grads(True)
    assert not is_checkpointing(tiny_model)  # switched off on the way out
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert all(g is not None and g.abs().sum() > 0 for g in checkpointed)
    for with_it, without in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(with_it, without)


def test_a_checkpointed_run_trains_the_same_adapter(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    runs = {}
    for on in (False, True):
        model = base_models.load_model(tiny_base, CPU)
        losses, seen = train(model, dataset, tmp_path / str(on), config(gradient_checkpointing=on))
        assert seen == [on] * 3
        runs[on] = losses, load_file(tmp_path / str(on) / "adapter_model.safetensors")
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], weight, atol=1e-5, rtol=1e-4)


def test_a_model_that_cannot_checkpoint_is_refused() -> None:
    model: Any = torch.nn.Linear(2, 2)
    with (
        pytest.raises(InputError, match="does not support gradient checkpointing") as refused,
        gradient_checkpointing(model, True),
    ):
        pass
    assert refused.value.field == "gradient_checkpointing"


@pytest.mark.parametrize(
    ("choice", "device", "dtype"),
    [
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cpu", torch.float32),
        ("float32", "cuda", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
    ],
)
def test_base_dtype_auto_is_bf16_on_cuda_only(choice: str, device: str, dtype: torch.dtype) -> None:
    assert base_dtype_for(choice, torch.device(device)) == dtype


def test_a_bf16_base_trains_fp32_adapters_and_optimizer_state(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    # The CUDA default ("auto"), forced on the CPU: bf16 base, fp32 A, B and AdamW state.
    cfg = config(base_dtype="bfloat16", checkpoint_every=2)
    model = load_training_base(tiny_base, cfg, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    losses, _ = train(model, dataset, tmp_path, cfg)
    assert all(torch.isfinite(torch.tensor(losses)))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora
    assert {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in lora} == {torch.bfloat16}
    state = torch.load(tmp_path / "checkpoints" / "step-2" / "trainer_state.pt")
    adam = state["optimizer"]["state"].values()
    moments = [s[k] for s in adam for k in ("exp_avg", "exp_avg_sq")]
    assert moments
    assert {m.dtype for m in moments} == {torch.float32}


@needs_bitsandbytes
def test_nf4_base_trains_an_adapter_that_serves_on_the_unquantized_base(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    cfg = config(quantize="nf4", max_steps=8, learning_rate=3e-2, lora=LoraSpec(r=4, alpha=8))
    model = load_training_base(tiny_base, cfg, CPU)
    q_proj = model.get_decoder().layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8  # 4-bit codes, two a byte
    job = TrainingJob(model, dataset.train, dataset.eval, cfg, tmp_path, pad_id=0, progress=False)
    result = train_adapter(job)
    assert result.eval_loss < result.base_eval_loss
    assert all(layer.quantized for _, layer in lora_layers(model))
    with pytest.raises(InputError, match="cannot merge into a 4-bit quantized base"):
        merge_adapter(model, "default")
    assert all(not layer.merged for _, layer in lora_layers(model))  # nothing half merged
    # The adapter is a plain PEFT adapter: it loads, serves and merges on the full base.
    adapted, tokenizer = load_adapted(tiny_base, tmp_path)
    assert not any(layer.quantized for _, layer in lora_layers(adapted))
    reply = generate_reply(adapted, tokenizer, [{"role": "user", "content": "hi"}], 4, "default")
    assert isinstance(reply, str)
    merged = merge_to_folder(tiny_base, tmp_path, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


def test_nf4_without_bitsandbytes_says_what_to_install(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(InputError, match=r"lora-ops\[qlora\]") as refused:
        load_training_base(tiny_base, config(quantize="nf4"), CPU)
    assert refused.value.field == "quantize"


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"quantize": "int8"}, "quantize", "the only quantization is 'nf4'"),
        ({"base_dtype": "float16"}, "base_dtype", "must be one of auto, float32, bfloat16"),
        ({"packing": "sometimes"}, "packing", "valid boolean"),
        ({"gradient_checkpointing": "on and off"}, "gradient_checkpointing", "valid boolean"),
    ],
)
def test_bad_memory_options_are_refused_at_the_door(
    overrides: dict[str, Any], field: str, reason: str
) -> None:
    from lora_ops.cli.options import train_config

    with pytest.raises(InputError, match=reason) as refused:
        train_config(overrides)
    assert refused.value.field == field
    with pytest.raises(InputError, match=reason) as refused:
        CustomerSpec(id="acme", data_uri=str(SAMPLE), training=overrides)
    assert refused.value.field == f"training.{field}"


def test_a_customer_record_carries_the_options_to_its_retrain_runs() -> None:
    chosen = {"packing": True, "gradient_checkpointing": True, "base_dtype": "bfloat16"}
    spec = CustomerSpec(id="acme", data_uri=str(SAMPLE), training={**chosen, "quantize": "nf4"})
    config = retrain_parameters(spec)["config"]
    assert {key: config[key] for key in chosen} == chosen
    assert config["quantize"] == "nf4"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_base_is_bf16_by_default_with_fp32_adapters(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    model = load_training_base(tiny_base, config(), "cuda")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    losses, _ = train(model, dataset, tmp_path, config(gradient_checkpointing=True))
    assert all(torch.isfinite(torch.tensor(losses)))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora
    assert all(p.dtype == torch.float32 and p.is_cuda for p in lora)
