"""The LoRA training loop: AdamW, warmup + cosine, accumulation, clipping, exact resume.

A run is one ``TrainingJob``. It reports through ``TrainingHooks`` (after each step, after
each checkpoint) and never imports a tracking library itself: the pipeline's hooks
(``training.run_log``) log to MLflow and copy checkpoints to S3.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lora_ops.base_models import autocast_for
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import adapters_in_use, apply_lora, save_adapter
from lora_ops.training import checkpoints
from lora_ops.training.batching import Tokenized, collate, count_loss_tokens, summed_nll
from lora_ops.training.evaluate import eval_loss

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
        hooks: called after every optimizer step and every checkpoint.
        progress: show a progress bar.
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

    @property
    def checkpoint_folder(self) -> Path:
        return self.checkpoint_dir or self.out_dir / "checkpoints"


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to zero. ``step`` counts from 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps_for(n_train: int, config: TrainConfig) -> int:
    micro_per_epoch = math.ceil(n_train / config.batch_size)
    per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    return config.max_steps if config.max_steps is not None else per_epoch * config.epochs


def micro_batches(n_train: int, config: TrainConfig, start_step: int) -> Iterator[list[int]]:
    """Example indices of each micro-batch from optimizer step ``start_step`` on.

    Each epoch's order is a permutation drawn from (seed, epoch) alone, so a resumed run
    sees exactly the batches the uninterrupted run would have seen.
    """
    micro_per_epoch = math.ceil(n_train / config.batch_size)
    m = start_step * config.grad_accum
    order: list[int] = []
    epoch = -1
    while True:
        if m // micro_per_epoch != epoch:
            epoch = m // micro_per_epoch
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            order = torch.randperm(n_train, generator=generator).tolist()
        start = (m % micro_per_epoch) * config.batch_size
        yield order[start : start + config.batch_size]
        m += 1


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

    Raises:
        InputError: a split is empty, or the checkpoint to resume from belongs to another
            config, dataset or base model.
    """
    if not job.train_examples:
        raise InputError("no training examples", field="data")
    if not job.eval_examples:
        raise InputError("no evaluation examples", field="data")
    model, config = job.model, job.config
    device = next(model.parameters()).device
    fingerprint = checkpoints.fingerprint(config.model_dump_json(), job.run_key)
    seed_everything(config.seed)
    eval_started = time.perf_counter()
    base_loss = eval_loss(model, job.eval_examples, job.pad_id, config.batch_size)
    eval_seconds = time.perf_counter() - eval_started
    report = apply_lora(model, config.lora)  # A drawn from the seeded generator
    log.info("%s", report)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    start_step = 0
    if job.resume and (latest := checkpoints.latest(job.checkpoint_folder)) is not None:
        start_step = checkpoints.restore(latest, model, optimizer, fingerprint)
        log.info("resumed from %s (step %d)", latest, start_step)
    total_steps = total_steps_for(len(job.train_examples), config)
    losses = _run_steps(job, optimizer, fingerprint, start_step, total_steps)
    eval_started = time.perf_counter()
    with adapters_in_use(model, "default"):
        adapted_loss = eval_loss(model, job.eval_examples, job.pad_id, config.batch_size)
    eval_seconds += time.perf_counter() - eval_started
    save_adapter(model, job.out_dir, base_model_name_or_path=job.base_model_name)
    result = TrainResult(
        adapter_dir=job.out_dir,
        steps=total_steps,
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
    )
    summary = json.dumps(result.to_json(), indent=2) + "\n"
    (job.out_dir / "training_summary.json").write_text(summary)
    return result


@dataclass
class _LoopRecord:
    losses: list[float]
    tokens_per_second: float
    step_seconds: float  # inside _optimizer_step only: no hooks, no checkpoints


def _run_steps(
    job: TrainingJob,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    start_step: int,
    total_steps: int,
) -> _LoopRecord:
    """Optimizer steps ``start_step`` to ``total_steps``, with their hooks and checkpoints."""
    model, config, examples = job.model, job.config, job.train_examples
    batches = micro_batches(len(examples), config, start_step)
    losses: list[float] = []
    tokens_seen, started, step_seconds = 0, time.perf_counter(), 0.0
    model.train()
    bar = tqdm(
        total=total_steps, initial=start_step, desc="train", unit="step", disable=not job.progress
    )
    with adapters_in_use(model, "default"), bar:
        for step in range(start_step, total_steps):
            window = [[examples[i] for i in next(batches)] for _ in range(config.grad_accum)]
            lr = learning_rate_at(step, total_steps, config)
            step_started = time.perf_counter()
            loss, norm = _optimizer_step(model, optimizer, window, job.pad_id, lr, config)
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
            if _checkpoint_due(step + 1, total_steps, config):
                _save_checkpoint(job, optimizer, fingerprint, step + 1)
    model.eval()
    elapsed = max(time.perf_counter() - started, 1e-9)
    return _LoopRecord(
        losses=losses, tokens_per_second=tokens_seen / elapsed, step_seconds=step_seconds
    )


def _save_checkpoint(
    job: TrainingJob, optimizer: torch.optim.Optimizer, fingerprint: str, done: int
) -> None:
    folder, model = job.checkpoint_folder, job.model
    saved = checkpoints.save(folder, done, model, optimizer, fingerprint, job.base_model_name)
    job.hooks.on_checkpoint(saved, done)


def _checkpoint_due(done: int, total_steps: int, config: TrainConfig) -> bool:
    # No checkpoint after the last step: the finished adapter is written instead.
    every = config.checkpoint_every
    return every is not None and done % every == 0 and done < total_steps


def _optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    window: list[list[Tokenized]],
    pad_id: int,
    lr: float,
    config: TrainConfig,
) -> tuple[float, float]:
    """One optimizer step over a window of micro-batches; returns (loss, gradient norm).

    Each micro-batch's summed loss is divided by the labelled tokens of the whole window,
    so accumulation gives the same gradient as one big batch.
    """
    device = next(model.parameters()).device
    window_tokens = max(1, sum(count_loss_tokens(micro) for micro in window))
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for micro in window:
        batch = collate(micro, pad_id, device)
        with autocast_for(device):
            loss = summed_nll(model, batch) / window_tokens
        loss.backward()
        step_loss += loss.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = _clip(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, norm


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    if max_norm is None:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def train_from_files(
    base: str | Path,
    data_path: Path,
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    hooks: TrainingHooks | None = None,
    progress: bool = True,
) -> TrainResult:
    """Base name or folder + JSONL file -> adapter folder: the ``lora-ops train`` command.

    The data is checked in full before the model is loaded, so bad data fails in seconds
    and leaves nothing behind.
    """
    # Imported here: data pulls in the tokenizer stack, and this keeps the loop importable
    # by callers that bring their own tokenized examples.
    from lora_ops import base_models, data

    folder = base_models.resolve_base(base)
    base_models.check_lora_fits(folder, config.lora)
    tokenizer = base_models.load_tokenizer(folder)
    dataset = data.prepare_dataset(
        Path(data_path),
        tokenizer,
        max_seq_len=config.max_seq_len,
        eval_fraction=config.eval_fraction,
    )
    model = base_models.load_model(folder)
    job = TrainingJob(
        model=model,
        train_examples=dataset.train,
        eval_examples=dataset.eval,
        config=config,
        out_dir=Path(out_dir),
        pad_id=int(tokenizer.pad_token_id),
        base_model_name=base_models.base_name(folder),
        resume=resume,
        run_key=f"{dataset.sha256}:{base_models.base_sha256(folder)}",
        hooks=hooks or TrainingHooks(),
        progress=progress,
    )
    return train_adapter(job)
