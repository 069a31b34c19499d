"""The replica's HTTP API fuzzed from its own OpenAPI schema, in process.

Schemathesis draws valid and invalid bodies for every operation (boundary values first,
then random ones) and checks each answer: never a 5xx, a status and content type the
schema documents, and a body that matches the documented shape. The engine's context is
cut to 64 tokens so the largest requests the schema allows stay cheap to refuse or serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import positive_data_acceptance

from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from tests.serving.replicas import make_adapters

ADMIN = "fuzz-admin-token-0123456789"
EXAMPLES = 100  # per operation and mode: the whole fuzz stays near a minute on two cores
# Random model names are all unknown (404): half the requests name a served model instead.
KNOWN_MODELS = st.sampled_from([None, "base", "acme"])
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("fuzz-adapters")
    adapters = make_adapters(tiny_base, root, ["acme"])
    served = Engine(EngineConfig(tiny_base, max_model_len=64, adapter_roots=[root]))
    served.load_adapter("acme", AdapterSource(str(adapters["acme"])))
    yield served
    served.close()


@pytest.fixture(scope="module")
def api(engine: Engine) -> BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(engine, ADMIN))


def test_the_schema_lists_every_operation(api: BaseSchema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE  # GETs take no input to break
]


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES]
)
def test_no_server_errors_and_answers_match_the_schema(
    api: BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode), model=KNOWN_MODELS)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # shrinking decodes for minutes; curl is shown
        database=None,  # the same examples on every machine and run
        derandomize=True,
    )
    def check(case: schemathesis.Case, model: str | None) -> None:
        positive = mode is GenerationMode.POSITIVE
        if positive and model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # reach the decoder, not only the 404
        # A valid-looking request may still be refused (an unknown model, a path outside
        # the adapter roots, a prompt beyond the context): 4xx is right there, so
        # positive_data_acceptance (valid input -> 2xx) does not apply.
        response = case.call_and_validate(
            timeout=120,  # the machine's two cores may be shared with other test runs
            headers={"Authorization": f"Bearer {ADMIN}"},
            excluded_checks=[positive_data_acceptance],
        )
        assert response.status_code < 500, response.text

    check()
