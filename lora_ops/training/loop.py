"""The LoRA training loop: AdamW, warmup + cosine, accumulation, clipping, exact resume.

A run is one ``TrainingJob``. It reports through ``TrainingHooks`` (after each step, each
held-out evaluation and each checkpoint) and never imports a tracking library itself: the
pipeline's hooks (``training.run_log``) log to MLflow and copy checkpoints to S3.

With ``eval_every`` the held-out loss steers the run: measured every N steps and after the
last, the best-scoring weights (not the last) become the adapter, and with
``early_stopping_patience`` the run stops once that many evaluations bring no improvement.

Under ``torchrun`` (``training.distributed``) each rank trains on its share of every
micro-batch and the gradients are summed, so the run is the one a single process makes at
the same global batch; rank 0 alone writes files and calls the hooks.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import (
    TrainableReport,
    adapters_in_use,
    apply_lora,
    load_adapter_weights,
    save_adapter,
)
from lora_ops.training import checkpoints, distributed
from lora_ops.training.batching import Tokenized, count_loss_tokens
from lora_ops.training.evaluate import eval_loss_across_ranks
from lora_ops.training.memory import gradient_checkpointing
from lora_ops.training.packing import training_rows
from lora_ops.training.schedule import learning_rate_at, micro_batches, total_steps_for
from lora_ops.training.step import optimizer_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports to ``on_step``."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int
    tokens_per_second: float
    elapsed_seconds: float


@dataclass(frozen=True)
class EvalMetrics:
    """What one held-out evaluation reports to ``on_evaluation``."""

    step: int
    total_steps: int
    loss: float
    best_step: int
    best_loss: float
    improved: bool


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    adapter_dir: Path
    steps: int
    train_losses: list[float]
    base_eval_loss: float
    eval_loss: float
    trainable_parameters: int
    total_parameters: int
    tokens_per_second: float
    peak_memory_bytes: int
    resumed_from_step: int = 0
    # Seconds of compute: inside the optimizer steps, and inside the held-out loss passes
    # (base and adapted). What the run spent around them (loading, logging, checkpoints)
    # is the difference to its wall time.
    step_seconds: float = 0.0
    eval_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    # With eval_every: the step whose weights were kept (eval_loss is theirs), the held-out
    # loss of the last step's weights, every (step, loss) measured, and whether patience ran out.
    best_step: int | None = None
    last_eval_loss: float | None = None
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


class TrainingHooks:
    """What a run calls as it goes. These do nothing: override the ones you need.

    A hook that raises stops the run; the checkpoints written so far stay for a resume.
    """

    def on_step(self, metrics: StepMetrics) -> None:
        """Called after every optimizer step."""

    def on_checkpoint(self, folder: Path, step: int) -> None:
        """Called after checkpoint ``step`` is written to ``folder``, e.g. to copy it to
        object storage."""

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        """Called after each held-out evaluation (``eval_every``)."""


@dataclass(frozen=True)
class TrainingJob:
    """One adapter to train: the model, its data and hyperparameters, where things go.

    Attributes:
        model: the base model (any device); gets an adapter named ``default``.
        train_examples: tokenized examples with labels (-100 where no loss).
        eval_examples: held-out examples; base and adapted loss are measured on them.
        config: hyperparameters.
        out_dir: where the adapter folder is written.
        pad_id: the tokenizer's padding id.
        base_model_name: recorded as ``base_model_name_or_path`` in adapter_config.json.
        checkpoint_dir: where resumable checkpoints go (default ``out_dir/checkpoints``).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
        run_key: identifies the data and base; a checkpoint made with another key (or
            config) is refused rather than silently continued.
        hooks: called after every optimizer step, evaluation and checkpoint.
        progress: show a progress bar.
        initial_adapter: a PEFT adapter folder whose weights the run starts from (warm
            start) instead of a fresh adapter; its LoRA shape must be ``config.lora``'s.
    """

    model: PreTrainedModel
    train_examples: Sequence[Tokenized]
    eval_examples: Sequence[Tokenized]
    config: TrainConfig
    out_dir: Path
    pad_id: int
    base_model_name: str = ""
    checkpoint_dir: Path | None = None
    resume: bool = False
    run_key: str = ""
    hooks: TrainingHooks = field(default_factory=TrainingHooks)
    progress: bool = True
    initial_adapter: Path | None = None

    @property
    def checkpoint_folder(self) -> Path:
        return self.checkpoint_dir or self.out_dir / "checkpoints"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def train_adapter(job: TrainingJob) -> TrainResult:
    """Train one LoRA adapter on ``job.model`` and write it to ``job.out_dir`` in PEFT's format.

    With ``eval_every`` the adapter written is the best-evaluated one (``best_step``).

    Raises:
        InputError: a split is empty, or the checkpoint to resume from belongs to another
            config, dataset or base model.
    """
    if not job.train_examples:
        raise InputError("no training examples", field="data")
    if not job.eval_examples:
        raise InputError("no evaluation examples", field="data")
    job = _for_this_rank(job)
    model, config = job.model, job.config
    device = next(model.parameters()).device
    fingerprint = checkpoints.fingerprint(config.model_dump_json(), job.run_key)
    seed_everything(config.seed)
    eval_started = time.perf_counter()
    base_loss = eval_loss_across_ranks(model, job.eval_examples, job.pad_id, config.batch_size)
    eval_seconds = time.perf_counter() - eval_started
    report, optimizer = _adapter_and_optimizer(job)
    folder = job.checkpoint_folder if job.resume else None
    start_step, selection = checkpoints.resume(
        folder, model, optimizer, fingerprint, config.early_stopping_patience, distributed.rank()
    )
    losses = _train_rows(job, optimizer, fingerprint, start_step, selection)
    eval_started = time.perf_counter()
    adapted_loss, last_loss = _kept_and_last_loss(job, selection)
    eval_seconds += losses.eval_seconds + time.perf_counter() - eval_started
    result = TrainResult(
        adapter_dir=job.out_dir,
        steps=losses.steps_done,
        train_losses=losses.losses,
        base_eval_loss=base_loss,
        eval_loss=adapted_loss,
        trainable_parameters=report.trainable,
        total_parameters=report.total,
        tokens_per_second=losses.tokens_per_second,
        peak_memory_bytes=peak_memory_bytes(device),
        resumed_from_step=start_step,
        step_seconds=losses.step_seconds,
        eval_seconds=eval_seconds,
        best_step=selection.best_step,
        last_eval_loss=last_loss,
        evaluations=list(selection.history),
        stopped_early=losses.stopped_early,
    )
    _write_adapter(job, result)
    return result


def _for_this_rank(job: TrainingJob) -> TrainingJob:
    """The job as this rank runs it: only rank 0 reports (hooks, progress bar).

    The other ranks hold the same adapter and see the same losses, so their reports would
    say the same again, and a tracking hook would log every step twice.
    """
    if distributed.is_main():
        return job
    return replace(job, hooks=TrainingHooks(), progress=False)


def _adapter_and_optimizer(job: TrainingJob) -> tuple[TrainableReport, torch.optim.Optimizer]:
    """Put a fresh (or warm-started) adapter on the model; its AdamW optimizer."""
    model, config = job.model, job.config
    report = apply_lora(model, config.lora)  # A drawn from the seeded generator
    log.info("%s", report)
    if job.initial_adapter is not None:
        load_adapter_weights(model, job.initial_adapter)  # a resume overwrites them below
        log.info("warm start from the adapter in %s", job.initial_adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if distributed.is_distributed():
        distributed.copy_from_main(trainable)  # the ranks start from one adapter, whatever
        # Each rank its own dropout masks: with one seed they would all draw the same.
        seed_everything(config.seed + 1_000_003 * distributed.rank())
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    return report, optimizer


def _write_adapter(job: TrainingJob, result: TrainResult) -> None:
    """Rank 0 writes the adapter and its summary; every rank returns once they are there."""
    if distributed.is_main():
        save_adapter(job.model, job.out_dir, base_model_name_or_path=job.base_model_name)
        summary = json.dumps(result.to_json(), indent=2) + "\n"
        (job.out_dir / "training_summary.json").write_text(summary)
    distributed.barrier()


def _kept_and_last_loss(
    job: TrainingJob, selection: checkpoints.BestWeights
) -> tuple[float, float | None]:
    """Held-out loss of the weights the adapter keeps, and of the last step's (if measured).

    After evaluations the best-scoring weights are put back first; their loss is the one
    already measured, with the same examples and batches.
    """
    if selection.best_step is None:
        with adapters_in_use(job.model, "default"):
            loss = eval_loss_across_ranks(
                job.model, job.eval_examples, job.pad_id, job.config.batch_size
            )
        return loss, None
    selection.restore(job.model)
    if selection.best_step != selection.history[-1][0]:
        log.info(
            "kept the weights of step %d (held-out loss %.4f), not the last step's (%.4f)",
            selection.best_step,
            selection.best_loss,
            selection.history[-1][1],
        )
    return selection.best_loss, selection.history[-1][1]


def _train_rows(
    job: TrainingJob,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    start_step: int,
    selection: checkpoints.BestWeights,
) -> _LoopRecord:
    """The optimizer steps over the job's rows: its examples, or with packing their packs,
    checkpointing activations if asked."""
    rows = training_rows(job.train_examples, job.config)
    total_steps = total_steps_for(len(rows), job.config, len(job.train_examples))
    with gradient_checkpointing(job.model, job.config.gradient_checkpointing):
        on_rows = replace(job, train_examples=rows)
        return _run_steps(on_rows, optimizer, fingerprint, start_step, total_steps, selection)


@dataclass
class _LoopRecord:
    losses: list[float]
    tokens_per_second: float
    step_seconds: float  # inside optimizer_step only: no hooks, no checkpoints
    steps_done: int = 0  # the last optimizer step taken (counting from 1)
    stopped_early: bool = False
    eval_seconds: float = 0.0  # inside the held-out evaluations


def _run_steps(
    job: TrainingJob,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    start_step: int,
    total_steps: int,
    selection: checkpoints.BestWeights,
) -> _LoopRecord:
    """Optimizer steps ``start_step`` to ``total_steps``, with their hooks, evaluations and
    checkpoints; fewer when early stopping ends the run."""
    model, config, examples = job.model, job.config, job.train_examples
    batches = micro_batches(len(examples), config, start_step)
    losses: list[float] = []
    tokens_seen, started, step_seconds = 0, time.perf_counter(), 0.0
    record = _LoopRecord(losses, 0.0, 0.0, steps_done=start_step)
    model.train()
    bar = tqdm(
        total=total_steps, initial=start_step, desc="train", unit="step", disable=not job.progress
    )
    with adapters_in_use(model, "default"), bar:
        for step in range(start_step, total_steps):
            window = [[examples[i] for i in next(batches)] for _ in range(config.grad_accum)]
            mine = [distributed.share(micro) for micro in window]
            lr = learning_rate_at(step, total_steps, config)
            step_started = time.perf_counter()
            loss, norm = optimizer_step(model, optimizer, mine, job.pad_id, lr, config)
            step_seconds += time.perf_counter() - step_started
            losses.append(loss)
            tokens_seen += sum(len(e.input_ids) for micro in window for e in micro)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            metrics = StepMetrics(
                step=step + 1,
                total_steps=total_steps,
                loss=loss,
                learning_rate=lr,
                grad_norm=norm,
                tokens=sum(count_loss_tokens(micro) for micro in window),
                tokens_per_second=tokens_seen / elapsed,
                elapsed_seconds=elapsed,
            )
            job.hooks.on_step(metrics)
            record.steps_done = step + 1
            if _after_step(job, optimizer, fingerprint, selection, record, total_steps):
                break
    model.eval()
    elapsed = max(time.perf_counter() - started, 1e-9)
    record.tokens_per_second, record.step_seconds = tokens_seen / elapsed, step_seconds
    return record


def _after_step(
    job: TrainingJob,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    selection: checkpoints.BestWeights,
    record: _LoopRecord,
    total_steps: int,
) -> bool:
    """Evaluate and checkpoint when due; True when early stopping ends the run here."""
    done, config = record.steps_done, job.config
    every = config.eval_every
    if every is not None and (done % every == 0 or done == total_steps):
        started = time.perf_counter()
        loss = eval_loss_across_ranks(job.model, job.eval_examples, job.pad_id, config.batch_size)
        improved = selection.record(done, loss, job.model)
        record.eval_seconds += time.perf_counter() - started
        best_step = selection.best_step if selection.best_step is not None else done
        job.hooks.on_evaluation(
            EvalMetrics(done, total_steps, loss, best_step, selection.best_loss, improved)
        )
    if selection.exhausted and done < total_steps:
        log.info(
            "early stop at step %d: %d evaluations without improvement on step %s",
            done,
            selection.stale,
            selection.best_step,
        )
        record.stopped_early = True
        return True
    if _checkpoint_due(done, total_steps, config):
        _save_checkpoint(job, optimizer, fingerprint, done, selection)
    return False


def _save_checkpoint(
    job: TrainingJob,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    done: int,
    selection: checkpoints.BestWeights,
) -> None:
    # Every rank's RNG states, so each draws its own dropout masks again after a resume.
    rank_rng = None
    if distributed.is_distributed():
        rank_rng = distributed.gather_objects(checkpoints.rng_state())
    if not distributed.is_main():
        return
    folder, model, state = job.checkpoint_folder, job.model, selection.state()
    saved = checkpoints.save(
        folder, done, model, optimizer, fingerprint, job.base_model_name, state, rank_rng
    )
    job.hooks.on_checkpoint(saved, done)


def _checkpoint_due(done: int, total_steps: int, config: TrainConfig) -> bool:
    # No checkpoint after the last step: the finished adapter is written instead.
    every = config.checkpoint_every
    return every is not None and done % every == 0 and done < total_steps
