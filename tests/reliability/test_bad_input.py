"""Bad and hostile input at every door: the CLI, the flows and a replica's HTTP API.

Each input is refused with an error that names the problem (file:line, field), and when
everything has been refused, nothing of it is left in S3, MLflow or the service database.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from lora_ops import base_models, customers, names
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from lora_ops.registry import Registry
from lora_ops.storage import Storage
from tests.helpers import randomize_adapter
from tests.processes import ReplicaProcess
from tests.servers import RunningStack, free_port

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
GOOD = SAMPLE.read_text().splitlines()[:20]
TOKEN = "bad-input-admin-token"
runner = CliRunner()


@dataclass(frozen=True)
class BadData:
    name: str
    line: bytes | str | None  # put in place of line 6; None: the whole file is ``whole``
    expected: str  # in the error, after "FILE:6: " (or "FILE: " for whole-file problems)
    whole: bytes = b""


def _message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


TEN_MB = json.dumps({"messages": [_message("user", "x" * 10_000_000), _message("assistant", "y")]})
DATA = [
    BadData("broken-json", '{"messages": [{"role": "user"', "not valid JSON"),
    BadData("array", "[1, 2, 3]", "expected a JSON object, got an array"),
    BadData("messages-string", '{"messages": "hello"}', "messages: must be a list, got a string"),
    BadData(
        "unknown-role",
        json.dumps({"messages": [_message("wizard", "hi"), _message("assistant", "yo")]}),
        "unknown role 'wizard'",
    ),
    BadData(
        "number-content",
        json.dumps({"messages": [_message("user", 5), _message("assistant", "yo")]}),
        "messages[0].content: must be a string, got a number",
    ),
    BadData(
        "empty-content",
        json.dumps({"messages": [_message("user", " "), _message("assistant", "yo")]}),
        "messages[0].content: empty or whitespace-only",
    ),
    BadData(
        "prompt-only",
        json.dumps({"messages": [_message("user", "hi")]}),
        "no assistant turn, so nothing to learn from",
    ),
    BadData(
        "assistant-first",
        json.dumps({"messages": [_message("assistant", "hi"), _message("user", "yo")]}),
        "must start with a user turn",
    ),
    BadData(
        "empty-completion", '{"prompt": "hi", "completion": ""}', "completion: empty or whitespace"
    ),
    BadData("ten-mb-line", TEN_MB, "line is longer than"),
    BadData(
        "not-utf8", '{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8"
    ),
    BadData("duplicate", GOOD[0], "exact duplicate of line 1"),
    BadData("empty-file", None, "the file holds no examples"),
    BadData(
        "too-few",
        None,
        "only 3 valid examples; at least 10 are needed",
        "\n".join(GOOD[:3]).encode(),
    ),
]


def write_bad(case: BadData, folder: Path) -> Path:
    path = folder / f"{case.name}.jsonl"
    if case.line is None:
        path.write_bytes(case.whole)
        return path
    line = case.line.encode("latin-1") if case.name == "not-utf8" else case.line
    lines = [row.encode() for row in GOOD]
    lines[5] = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def where(case: BadData, path: Path) -> str:
    return f"{path}: {case.expected}" if case.line is None else f"{path}:6: "


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-data")
    return {case.name: write_bad(case, folder) for case in DATA}


@pytest.mark.parametrize("case", DATA, ids=[case.name for case in DATA])
def test_bad_data_at_the_cli(case: BadData, bad_files: dict[str, Path]) -> None:
    path = bad_files[case.name]
    result = runner.invoke(app(), ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert where(case, path) in result.output
    assert case.expected in result.output


def app() -> Any:
    from lora_ops.cli import app as cli_app

    return cli_app


FLOW_CUSTOMERS = {case.name: f"bad-{index}" for index, case in enumerate(DATA)}
TINY = TrainConfig(lora=LoraSpec(r=4, alpha=8), max_steps=2, batch_size=4, max_seq_len=256)


def run_retrain(customer: str, data_uri: str, **options: Any) -> Any:
    from flows.retrain import retrain

    return retrain(
        customer=customer, data_uri=data_uri, base=options.pop("base", "tiny-llama"),
        config=options.pop("config", TINY), **options,
    )  # fmt: skip


@pytest.mark.parametrize("case", DATA, ids=[case.name for case in DATA])
def test_bad_data_in_the_flow(
    case: BadData, bad_files: dict[str, Path], stack: RunningStack
) -> None:
    path = bad_files[case.name]
    with pytest.raises(InputError) as refused:
        run_retrain(FLOW_CUSTOMERS[case.name], str(path))
    assert where(case, path) in str(refused.value)
    assert case.expected in str(refused.value)


BAD_IDS = ["../x", "a b", "ACME", "x" * 200, ""]


@pytest.mark.parametrize("customer", BAD_IDS, ids=["dotdot", "space", "upper", "long", "empty"])
def test_bad_customer_ids_at_every_door(
    customer: str, stack: RunningStack, replica: ReplicaProcess, tmp_path: Path
) -> None:
    added = runner.invoke(app(), ["customers", "add", customer, "--data", str(SAMPLE)])
    assert isinstance(added.exception, InputError)
    assert "id: " in str(added.exception)
    ran = runner.invoke(app(), ["pipeline", "run", "--customer", customer, "--data", str(SAMPLE)])
    assert "is not a customer id" in str(ran.exception)
    with pytest.raises(InputError, match="is not a customer id"):
        run_retrain(customer, str(SAMPLE))
    body = {"lora_name": customer, "lora_path": str(tmp_path)}
    loaded = httpx.post(f"{replica.url}/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert loaded.status_code == 400, loaded.text
    message = loaded.json()["error"]["message"]
    assert "lora_name" in message or "is not a customer id" in message


@pytest.mark.parametrize(
    ("options", "field", "expected"),
    [
        ({"base": "no-such-model"}, "base", "no-such-model"),
        ({"config": TINY.model_copy(update={"lora": LoraSpec(r=65)})}, "r", "r <= 64"),
        (
            {"config": TINY.model_copy(update={"lora": LoraSpec(r=4, target_modules=("nope",))})},
            "target_modules",
            "'nope' matches no module",
        ),
    ],
    ids=["unknown-base", "rank-above-width", "no-such-target"],
)
def test_bad_training_setups_stop_before_anything_is_written(
    options: dict[str, Any], field: str, expected: str, stack: RunningStack
) -> None:
    with pytest.raises(InputError, match=expected) as refused:
        run_retrain("bad-setup", str(SAMPLE), **options)
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rank", "0"], "r: must be a whole number >= 1, got 0"),
        (["--rank", "-1"], "r: must be a whole number >= 1, got -1"),
        (["--rank", "65"], "r: 65 is larger than"),
        (["--target-modules", "nope"], "'nope' matches no module"),
        (["--lr", "0"], "learning_rate"),
        (["--max-steps", "-3"], "max_steps"),
        (["--max-seq-len", "5"], "max_seq_len"),
        (["--base", "no-such-model"], "no-such-model"),
    ],
    ids=["rank-0", "rank-neg", "rank-wide", "target", "lr-0", "steps-neg", "seq-5", "base"],
)
def test_bad_training_options_at_the_cli(args: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    base = [] if "--base" in args else ["--base", "tiny-llama"]
    result = runner.invoke(
        app(), ["train", *base, "--data", str(SAMPLE), "--out", str(out), "--max-steps", "1", *args]
    )
    assert result.exit_code != 0
    assert expected in str(result.exception)
    assert not out.exists()  # nothing half-written


# -- hostile adapter folders, loaded over HTTP and at the CLI ---------------------------------

HOSTILE_CONFIGS: dict[str, tuple[Any, str]] = {
    "r-negative": ({"r": -1}, "r: must be a whole number >= 1, got -1"),
    "r-string": ({"r": "abc"}, "r: must be a whole number >= 1"),
    "alpha-nan": ({"lora_alpha": math.nan}, "lora_alpha: must be a finite number > 0"),
    "alpha-inf": ({"lora_alpha": math.inf}, "lora_alpha: must be a finite number > 0"),
    "path-target": ({"target_modules": ["../../etc/passwd"]}, "is not a module name"),
    "r-huge": ({"r": 10**12}, "r=1000000000000 need lora_A"),
    "prompt-tuning": ({"peft_type": "PROMPT_TUNING"}, "peft_type is 'PROMPT_TUNING'"),
    "dora": ({"use_dora": True}, "use_dora: True is not supported"),
    "bias": ({"bias": "all"}, "bias: 'all' is not supported"),
    "not-an-object": ([1, 2], "must hold a JSON object"),
}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A good tiny-llama adapter, and hostile copies of it, under one folder."""
    root = tmp_path_factory.mktemp("adapters")
    model = base_models.load_model(tiny_base, "cpu")
    apply_lora(model, LoraSpec(r=4, alpha=8), adapter="good")
    randomize_adapter(model, "good")
    good = save_adapter(model, root / "good", adapter="good", base_model_name_or_path="tiny-llama")
    config = json.loads((good / "adapter_config.json").read_text())
    for name, (change, _) in HOSTILE_CONFIGS.items():
        shutil.copytree(good, root / name)
        body = {**config, **change} if isinstance(change, dict) else change
        (root / name / "adapter_config.json").write_text(json.dumps(body))
    shutil.copytree(good, root / "garbage-weights")
    (root / "garbage-weights" / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    return root


HOSTILE = {**{n: e for n, (_, e) in HOSTILE_CONFIGS.items()}, "garbage-weights": "safetensors"}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def replica(
    adapter_root: Path, stack: RunningStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaProcess]:
    process = ReplicaProcess(
        free_port(),
        tmp_path_factory.mktemp("replica") / "replica.log",
        TOKEN,
        extra_args=["--no-bootstrap", "--adapter-root", str(adapter_root)],
    )
    process.start()
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.parametrize("name", sorted(HOSTILE), ids=sorted(HOSTILE))
def test_hostile_adapters_over_http_and_at_the_cli(
    name: str, adapter_root: Path, replica: ReplicaProcess
) -> None:
    body = {"lora_name": "hostile", "lora_path": str(adapter_root / name)}
    loaded = httpx.post(f"{replica.url}/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert loaded.status_code == 400, loaded.text
    assert HOSTILE[name] in loaded.json()["error"]["message"]
    models = httpx.get(f"{replica.url}/v1/models", headers=ADMIN).json()["data"]
    assert "hostile" not in [model["id"] for model in models]
    asked = runner.invoke(
        app(),
        [
            "generate",
            "--base",
            "tiny-llama",
            "--adapter",
            str(adapter_root / name),
            "--prompt",
            "hi",
        ],
    )
    assert isinstance(asked.exception, InputError)
    assert HOSTILE[name] in str(asked.exception)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 7}, "temperature"),
        ({"messages": []}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["x"] * 10}, "stop"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": ""}, "model"),
    ],
    ids=["temperature", "no-messages", "max-tokens-0", "ten-stops", "role", "empty-model"],
)
def test_bad_requests_over_http(body: dict[str, Any], param: str, replica: ReplicaProcess) -> None:
    request = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **body}
    answered = httpx.post(f"{replica.url}/v1/chat/completions", json=request)
    assert answered.status_code == 400, answered.text
    error = answered.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_nothing_was_left_behind(stack: RunningStack) -> None:
    """After every refusal above: no data, checkpoints, runs, versions or records."""
    storage = Storage.from_settings(stack.settings)
    registry = Registry(stack.settings.mlflow_tracking_uri)
    for customer in [*FLOW_CUSTOMERS.values(), "bad-setup"]:
        for prefix in (f"datasets/{customer}/", f"checkpoints/{customer}/"):
            assert storage.list_keys(names.s3_uri(stack.settings.bucket, prefix)) == []
        assert registry.latest_versions(customer) == []
        experiment = registry.client.get_experiment_by_name(names.experiment_name(customer))
        assert experiment is None or registry.client.search_runs([experiment.experiment_id]) == []
    assert not set(BAD_IDS) & {record.id for record in customers.list_customers()}
