"""Training from local files, no servers: the ``lora-ops train`` command."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.training import distributed
from lora_ops.training.loop import TrainingHooks, TrainingJob, TrainResult, train_adapter
from lora_ops.training.memory import load_training_base


def train_from_files(
    base: str | Path,
    data_path: Path,
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    hooks: TrainingHooks | None = None,
    progress: bool = True,
    validation_path: Path | None = None,
) -> TrainResult:
    """Base name or folder + JSONL file -> adapter folder: the ``lora-ops train`` command.

    The data is checked in full before the model is loaded, so bad data fails in seconds
    and leaves nothing behind. ``validation_path`` holds the held-out examples instead of
    a share of the data file. Under ``torchrun`` the processes train data-parallel
    (``training.distributed``), rank 0 alone writing files and calling ``hooks``.

    Raises:
        InputError: bad data, or ``config.warm_start``, which needs the model registry.
    """
    if config.warm_start is not None:
        raise InputError(
            "a warm start needs the customer's registered production adapter: use "
            "`lora-ops pipeline run --customer ...`, not `lora-ops train`",
            field="warm_start",
        )
    with distributed.process_group():
        job = _job_from_files(base, data_path, config, out_dir, validation_path)
        return train_adapter(
            replace(job, resume=resume, hooks=hooks or TrainingHooks(), progress=progress)
        )


def _job_from_files(
    base: str | Path,
    data_path: Path,
    config: TrainConfig,
    out_dir: Path,
    validation_path: Path | None,
) -> TrainingJob:
    """The job ``train_from_files`` runs, its hooks and resume flag aside."""
    # Imported here: data pulls in the tokenizer stack, and this keeps the loop importable
    # by callers that bring their own tokenized examples.
    from lora_ops import base_models, data

    with distributed.main_first():  # one process fills the model cache, the others read it
        folder = base_models.resolve_base(base)
    base_models.check_lora_fits(folder, config.lora)
    tokenizer = base_models.load_tokenizer(folder)
    dataset = data.prepare_dataset(
        Path(data_path),
        tokenizer,
        max_seq_len=config.max_seq_len,
        eval_fraction=config.eval_fraction,
        validation_path=Path(validation_path) if validation_path is not None else None,
    )
    model = load_training_base(folder, config, distributed.local_device())
    return TrainingJob(
        model=model,
        train_examples=dataset.train,
        eval_examples=dataset.eval,
        config=config,
        out_dir=Path(out_dir),
        pad_id=int(tokenizer.pad_token_id),
        base_model_name=base_models.base_name(folder),
        run_key=f"{dataset.sha256}:{base_models.base_sha256(folder)}",
    )
