"""Each way a retrain run can end, in seconds: registered, no new data, gate failed, bad data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.conftest import InMemoryPipeline, run_retrain

SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
TRAINING_STEPS = ["check-data", "find-registered-version", "prep", "train", "evaluate", "register"]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "acme.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:12]))
    return path


def test_new_data_is_trained_evaluated_and_registered(
    steps: InMemoryPipeline, data_file: Path
) -> None:
    state = run_retrain(str(data_file))
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "registered"
    assert result["version"] == "1"
    assert result["new_version"] is True
    assert result["deployed"] is None
    assert result["gate"]["passed"] is True
    assert result["gate"]["improvement"] == pytest.approx(0.5)
    assert state.message == f"registered adapter-acme version 1 ({result['gate']['reason']})"
    # check-data is the real data check, so it is not in the in-memory pipeline's calls
    assert steps.calls == TRAINING_STEPS[1:]
    assert steps.review_requests == []


def test_the_same_data_again_registers_nothing(steps: InMemoryPipeline, data_file: Path) -> None:
    first = run_retrain(str(data_file))
    assert first.result()["version"] == "1"
    steps.calls.clear()

    again = run_retrain(str(data_file))
    assert again.is_completed()
    assert again.name == "No new data"
    result = again.result()
    assert result == {
        "customer": "acme",
        "status": "no new data",
        "version": "1",
        "new_version": False,
        "dataset_sha256": first.result()["dataset_sha256"],
    }
    assert steps.calls == ["find-registered-version"]  # no prep, no training


def test_a_failed_gate_fails_the_run_at_once_and_registers_nothing(
    steps: InMemoryPipeline, data_file: Path
) -> None:
    steps.candidate_loss = steps.base_loss * 0.999  # 0.1% better; the gate asks for more
    state = run_retrain(str(data_file), min_improvement=0.01)
    assert state.is_failed()
    assert "gate failed for acme" in state.message
    assert "the gate needs at least 1.0%" in state.message
    assert steps.calls.count("register") == 1  # a failed gate fails the same way again
    assert steps.versions == {}


def test_bad_data_fails_the_run_naming_the_line_and_nothing_runs_after(
    steps: InMemoryPipeline, data_file: Path
) -> None:
    lines = data_file.read_text().splitlines(keepends=True)
    data_file.write_text("".join(lines[:2]) + '{"messages": [\n' + "".join(lines[2:]))
    state = run_retrain(str(data_file))
    assert state.is_failed()
    assert f"{data_file}:3" in state.message
    assert steps.calls == []  # nothing looked up, prepared or trained


def test_a_missing_file_fails_the_run_naming_it(steps: InMemoryPipeline, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    state = run_retrain(str(missing))
    assert state.is_failed()
    assert str(missing) in state.message
    assert "no such file" in state.message
    assert steps.calls == []


def test_a_registry_hiccup_is_retried_and_the_run_still_registers(
    steps: InMemoryPipeline, data_file: Path
) -> None:
    steps.failures["register"] = [ConnectionError("registry restarting")]
    state = run_retrain(str(data_file))
    assert state.is_completed(), state.message
    assert state.result()["version"] == "1"
    assert steps.calls.count("register") == 2


def test_require_review_without_auto_deploy_marks_the_version(
    steps: InMemoryPipeline, data_file: Path
) -> None:
    state = run_retrain(str(data_file), require_review=True)
    assert state.is_completed(), state.message
    assert state.result()["status"] == "registered"
    assert steps.review_requests == [("acme", "1")]


def test_the_deployment_form_needs_only_the_customer_and_the_data() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.retrain import retrain

    schema = parameter_schema(retrain).model_dump()
    assert schema["required"] == ["customer", "data_uri"]
    assert schema["properties"]["config"]["default"]["learning_rate"] == 2e-4


def test_a_validation_file_is_new_data_of_its_own(
    steps: InMemoryPipeline, data_file: Path, tmp_path: Path
) -> None:
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[20:32]))
    plain = run_retrain(str(data_file)).result()
    with_file = run_retrain(str(data_file), validation_data_uri=str(held_out))
    assert with_file.is_completed(), with_file.message
    result = with_file.result()
    assert result["new_version"] is True
    assert result["dataset_sha256"] != plain["dataset_sha256"]
    steps.calls.clear()
    again = run_retrain(str(data_file), validation_data_uri=str(held_out))
    assert again.name == "No new data"
    assert steps.calls == ["find-registered-version"]


def test_a_bad_validation_file_fails_the_run_naming_its_line(
    steps: InMemoryPipeline, data_file: Path, tmp_path: Path
) -> None:
    held_out = tmp_path / "held-out.jsonl"
    lines = SAMPLE.read_text().splitlines(keepends=True)[20:32]
    held_out.write_text("".join(lines[:3]) + '{"messages": []}\n' + "".join(lines[3:]))
    state = run_retrain(str(data_file), validation_data_uri=str(held_out))
    assert state.is_failed()
    assert f"{held_out}:4" in state.message
    missing = run_retrain(str(data_file), validation_data_uri=str(tmp_path / "nowhere.jsonl"))
    assert missing.is_failed()
    assert "validation_data_uri: no such file" in missing.message
    assert steps.calls == []
