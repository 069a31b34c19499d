"""Pipeline overhead: the retrain flow's wall time, split into compute and everything else.

The real ``retrain`` flow (check data, prep, train, evaluate, register) runs on the sample
customer's data against an embedded stack of its own (S3, MLflow and Prefect servers on
fresh ports, in a throwaway folder), once per base model, each in a fresh Python process as
``lora-ops pipeline run`` would. The flow's wall time is split into

- inside: the optimizer steps and the held-out loss passes of training, and evaluation's
  loss passes and generations, as the run recorded them in MLflow (``train_step_seconds``,
  ``train_eval_seconds``, ``evaluate_seconds``);
- everything else (overhead): Prefect, MLflow, S3, loading models and data, checkpoints.

Everything else is broken down by Prefect task (task run durations from Prefect's API,
less the compute inside them) and by kind: the child process times the library calls that
do each kind of work (base loads, checkpoint uploads, MLflow calls...) by wrapping them,
each counted once (a call inside another counts for the inner kind only), and whatever
lies outside the pipeline's step functions is Prefect's. The process's own start-up
(interpreter and imports) comes on top and is reported beside it, not in the flow's total.

    .venv/bin/python bench/pipeline.py                      # both bases, the demo settings
    .venv/bin/python bench/pipeline.py --bases tiny-llama --max-steps 4 --no-write
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import pick_device, report

from lora_ops.settings import OUTSIDE_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "acme-support.jsonl"
SMOLLM2, TINY = "smollm2-135m-instruct", "tiny-llama"
TARGET_SHARE = 0.15  # of the SmolLM2 run's wall time, for everything but compute
INSIDE_METRICS = {
    "train_steps": "train_step_seconds",
    "train_eval": "train_eval_seconds",
    "evaluate": "evaluate_seconds",
}
TASK_INSIDE = {"train": ("train_steps", "train_eval"), "evaluate": ("evaluate",)}


# -- the parent: a stack of its own, one child process per base, the report --------------


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    device = pick_device(args.device)
    for name in OUTSIDE_VARIABLES:
        os.environ.pop(name, None)
    from lora_ops import base_models
    from lora_ops import stack as embedded

    for base in args.bases:  # a first import converts the model: not part of any run
        base_models.resolve_base(base)
    with tempfile.TemporaryDirectory(prefix="lora-ops-bench-") as state:
        settings = stack_settings(Path(state) / "stack")
        embedded.up(settings)
        try:
            env = child_env(embedded.service_env(settings), Path(state), device.type)
            runs = {base: run_in_child(base, args, env, Path(state)) for base in args.bases}
        finally:
            embedded.down(settings)
    figures: dict[str, Any] = {"target_overhead_share": TARGET_SHARE}
    if SMOLLM2 in runs:
        figures["target_met"] = runs[SMOLLM2]["overhead_share"] < TARGET_SHARE
    figures["runs"] = runs
    report("pipeline", figures, device, summary_of(runs), write=not args.no_write)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--bases", "--base", nargs="+", default=[TINY, SMOLLM2], help="catalogue names or folders"
    )
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="cpu hides the GPU"
    )
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-base", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    return parser.parse_args()


def stack_settings(state_dir: Path) -> Any:
    """Settings of a stack of our own: its folder and ports the kernel just handed out."""
    import socket

    from lora_ops.settings import Settings

    sockets = [socket.socket() for _ in range(3)]
    try:
        for sock in sockets:  # bound together, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        s3, mlflow, prefect = (int(sock.getsockname()[1]) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    return Settings(state_dir=state_dir, s3_port=s3, mlflow_port=mlflow, prefect_port=prefect)


def child_env(service_env: dict[str, str], state: Path, device: str) -> dict[str, str]:
    env = {**os.environ, **service_env}
    env["PREFECT_HOME"] = str(state / "client-prefect")  # results and profiles stay in here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_in_child(base: str, args: argparse.Namespace, env: dict[str, str], state: Path) -> Any:
    """One retrain run of ``base`` in a fresh process; its figures."""
    result = state / f"{customer_id(base)}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--child-base", base]
    command += ["--result", str(result), "--max-steps", str(args.max_steps)]
    command += ["--checkpoint-every", str(args.checkpoint_every), "--rank", str(args.rank)]
    command += ["--alpha", str(args.alpha), "--lr", str(args.lr)]
    command += ["--launched", repr(time.time())]
    # The child's logs go to stderr: stdout carries the one JSON line.
    subprocess.run(command, env=env, cwd=ROOT, stdout=sys.stderr, check=True)
    return json.loads(result.read_text())


def summary_of(runs: dict[str, Any]) -> str:
    parts = []
    for base, run in runs.items():
        part = (
            f"{base}: {run['total_s']:.1f} s, compute {run['inside_s']:.1f} s, everything else "
            f"{run['overhead_s']:.1f} s ({run['overhead_share']:.1%})"
        )
        if base == SMOLLM2:
            verdict = "met" if run["overhead_share"] < TARGET_SHARE else "missed"
            part += f", target <{TARGET_SHARE:.0%} {verdict}"
        parts.append(part)
    return "; ".join(parts)


# -- the child: one flow run, timed from inside ------------------------------------------


class Clock:
    """Seconds per kind of work, each call counted once: a wrapped call inside another
    counts for the inner kind only, and a call of a family (``s3``) inside one of the same
    family counts for the outer one (an upload_dir's own upload_file calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.inclusive: dict[str, float] = defaultdict(float)
        self.spans: list[tuple[float, float]] = []  # the step functions' (start, end)
        self._local = threading.local()

    def _frames(self) -> list[list[Any]]:
        if not hasattr(self._local, "frames"):
            self._local.frames = []
        frames: list[list[Any]] = self._local.frames
        return frames

    def wrap(
        self, fn: Callable[..., Any], label: str | Callable[..., str], family: str = ""
    ) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frames = self._frames()
            if family and any(frame[1] == family for frame in frames):
                return fn(*args, **kwargs)
            name = label if isinstance(label, str) else label(*args, **kwargs)
            frames.append([0.0, family])
            started = time.perf_counter()
            wall = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = frames.pop()[0]
                self.seconds[name] += elapsed - inner
                self.inclusive[name] += elapsed
                self.calls[name] += 1
                if frames:
                    frames[-1][0] += elapsed
                if family == "step":
                    self.spans.append((wall, wall + elapsed))

        return timed


# (module, function, kind); the step functions are what the Prefect tasks call.
WRAPPED = [
    ("lora_ops.pipeline", "data_fingerprint", "step:check-data"),
    ("lora_ops.pipeline", "existing_version", "step:find-registered-version"),
    ("lora_ops.pipeline", "prepare_data", "step:prep"),
    ("lora_ops.pipeline", "train_candidate", "step:train"),
    ("lora_ops.pipeline", "evaluate_candidate", "step:evaluate"),
    ("lora_ops.pipeline", "register_candidate", "step:register"),
    ("lora_ops.training.loop", "optimizer_step", "compute:train_steps"),
    ("lora_ops.training.loop", "eval_loss_across_ranks", "compute:train_eval"),
    ("lora_ops.pipeline", "evaluate_adapters", "compute:evaluate"),
    ("lora_ops.pipeline", "_services", "client_setup"),
    ("lora_ops.base_models", "load_model", "base_load"),
    ("lora_ops.base_models", "load_tokenizer", "tokenizer_load"),
    ("lora_ops.base_models", "check_lora_fits", "lora_fit_check"),
    ("lora_ops.data.arrow_prepare", "stage", "tokenize"),
    ("lora_ops.data.arrow_prepare", "build", "tokenize"),
    ("lora_ops.data.arrow_store", "load_arrow", "dataset_files"),
    ("lora_ops.training.loop", "apply_lora", "lora_inject"),
    ("lora_ops.training.checkpoints", "save", "checkpoint_save"),
    ("lora_ops.training.loop", "save_adapter", "adapter_save"),
    ("lora_ops.pipeline", "load_adapter", "adapter_load"),
    ("lora_ops.training.run_log", "plot_loss_curve", "loss_plot"),
    ("lora_ops.fleet.smoke", "smoke_reply", "smoke_reply"),
]
MLFLOW_ARTIFACTS = {
    "log_artifact",
    "log_artifacts",
    "log_table",
    "log_dict",
    "download_run_artifacts",
    "download_adapter",
}


def instrument(clock: Clock) -> None:
    """Wrap the calls that do each kind of work where the pipeline looks them up."""
    from lora_ops.registry import Registry
    from lora_ops.storage import Storage

    for module_name, attribute, kind in WRAPPED:
        module = importlib.import_module(module_name)
        family = "step" if kind.startswith("step:") else ""
        setattr(module, attribute, clock.wrap(getattr(module, attribute), kind, family))
    for name, fn in vars(Storage).items():
        if callable(fn) and not name.startswith("_") and name != "from_settings":
            setattr(Storage, name, clock.wrap(fn, functools.partial(_s3_kind, name), "s3"))
    for name, fn in vars(Registry).items():
        if callable(fn) and not name.startswith("_"):
            setattr(Registry, name, clock.wrap(fn, functools.partial(_mlflow_kind, name), "mlflow"))


def _s3_kind(method: str, *args: Any, **kwargs: Any) -> str:
    uris = [a for a in args[1:] if isinstance(a, str) and a.startswith("s3://")]
    return "s3_checkpoints" if any("/checkpoints/" in uri for uri in uris) else "s3"


def _mlflow_kind(method: str, *args: Any, **kwargs: Any) -> str:
    if method == "log_metrics" and kwargs.get("step") is not None:
        return "mlflow_step_metrics"
    if method in MLFLOW_ARTIFACTS:
        return "mlflow_artifacts"
    if method == "register_adapter":
        return "mlflow_register"
    return "mlflow"


def customer_id(base: str) -> str:
    """A customer of its own for each base: ``bench-tiny-llama``."""
    return "bench-" + re.sub(r"[^a-z0-9]+", "-", Path(base).name.lower()).strip("-")[:50]


def run_child(args: argparse.Namespace) -> None:
    from flows.retrain import retrain
    from lora_ops.config import TrainConfig
    from lora_ops.registry import Registry

    imported = time.time()
    clock = Clock()
    instrument(clock)
    config = TrainConfig.model_validate(
        {
            "lora": {"r": args.rank, "alpha": args.alpha},
            "learning_rate": args.lr,
            "max_steps": args.max_steps,
            "checkpoint_every": args.checkpoint_every,
        }
    )
    base = args.child_base
    started = time.time()
    state = retrain(
        customer=customer_id(base),
        data_uri=str(SAMPLE),
        base=base,
        config=config,
        # tiny-llama is random: its adapter learns little, and this run measures time alone
        min_improvement=0.05 if base == SMOLLM2 else 0.001,
        return_state=True,
    )
    ended = time.time()
    result = state.result()  # raises if the flow failed
    metrics = Registry().client.get_run(result["run_id"]).data.metrics
    inside = {name: float(metrics[key]) for name, key in INSIDE_METRICS.items()}
    prefect_record = task_durations(state.state_details.flow_run_id)
    figures = split(ended - started, inside, prefect_record, clock, started)
    figures["steps"] = args.max_steps
    figures["process_startup_s"] = round(imported - args.launched, 2)
    figures["prefect_flow_run_s"] = round(prefect_record[2], 2)
    figures["eval_loss"] = round(float(metrics["eval_loss"]), 4)
    figures["base_eval_loss"] = round(float(metrics["base_eval_loss"]), 4)
    args.result.write_text(json.dumps(figures))


def task_durations(flow_run_id: Any) -> tuple[dict[str, float], dict[str, float], float]:
    """Prefect's record of the flow run: seconds of each task (by name, in the flow run
    or a subflow run), of each subflow run beyond the tasks inside it, and of the whole."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        root = client.read_flow_run(flow_run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root.id])
            )
        )
        runs = [root, *children]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in runs]))
        )
        flow_names = {child.id: client.read_flow(child.flow_id).name for child in children}
    tasks: dict[str, float] = defaultdict(float)
    subflows = {child.id: _seconds(child) for child in children}
    stand_ins = {child.parent_task_run_id for child in children}  # a subflow's task in root
    for task_run in task_runs:
        if task_run.id in stand_ins:
            continue
        tasks[task_run.name.rsplit("-", 1)[0]] += _seconds(task_run)
        if task_run.flow_run_id in subflows:
            subflows[task_run.flow_run_id] -= _seconds(task_run)
    own = {f"subflow:{flow_names[run_id]}": seconds for run_id, seconds in subflows.items()}
    return dict(tasks), own, _seconds(root)


def _seconds(run: Any) -> float:
    if run.start_time is None or run.end_time is None:
        return 0.0
    return float((run.end_time - run.start_time).total_seconds())


def split(
    total: float,
    inside: dict[str, float],
    prefect_record: tuple[dict[str, float], dict[str, float], float],
    clock: Clock,
    started: float,
) -> dict[str, Any]:
    """The flow's wall time as compute and everything else, by task and by kind."""
    tasks, subflows, _ = prefect_record
    inside_s = sum(inside.values())
    overhead = total - inside_s
    by_task = {t: s - sum(inside[k] for k in TASK_INSIDE.get(t, ())) for t, s in tasks.items()}
    by_task |= subflows  # a subflow run's own start and finish, beyond its tasks
    by_task["outside_tasks"] = total - sum(tasks.values()) - sum(subflows.values())
    # Kinds: everything outside the step functions is Prefect's; inside them, each wrapped
    # call's own time, and what is left is the step functions' own code.
    steps = sum(v for k, v in clock.inclusive.items() if k.startswith("step:"))
    by_kind = {k: v for k, v in clock.seconds.items() if not k.startswith(("compute:", "step:"))}
    by_kind["step_code_other"] = sum(v for k, v in clock.seconds.items() if k.startswith("step:"))
    by_kind["prefect"] = total - steps
    prefect = {"before_first_step": 0.0, "after_last_step": 0.0}
    if clock.spans:
        prefect["before_first_step"] = min(s for s, _ in clock.spans) - started
        prefect["after_last_step"] = started + total - max(e for _, e in clock.spans)
    prefect["between_steps"] = by_kind["prefect"] - sum(prefect.values())
    timed_here = {k[8:]: v for k, v in clock.seconds.items() if k.startswith("compute:")}
    return {
        "total_s": round(total, 2),
        "inside_s": round(inside_s, 2),
        "overhead_s": round(overhead, 2),
        "overhead_share": round(overhead / total, 4),
        "inside_by_part_s": _rounded(inside),
        "inside_timed_here_s": _rounded(timed_here),  # a check on the figures MLflow holds
        "tasks_s": _rounded(tasks),
        "overhead_by_task_s": _rounded(by_task),
        "overhead_by_kind_s": _rounded(dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))),
        "prefect_s": _rounded(prefect),
        "calls": dict(sorted(clock.calls.items())),
    }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in values.items()}


if __name__ == "__main__":
    main()
