"""Training from local files, no servers: the ``lora-ops train`` command.

The data is prepared as the pipeline's prep step prepares it (``data.arrow_prepare``): read
once, checked, tokenized into a memory-mapped Arrow set in a local cache keyed by content,
tokenizer and settings, which the loop reads a row at a time. A second run on unchanged
data finds the set there and tokenizes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.settings import get_settings
from lora_ops.training import distributed
from lora_ops.training.loop import TrainingHooks, TrainingJob, TrainResult, train_adapter
from lora_ops.training.memory import load_training_base

if TYPE_CHECKING:  # only for hints: datasets is imported where data is prepared
    from transformers import PreTrainedTokenizerBase

    from lora_ops.data.arrow_store import ArrowPrepared

DataReport = Callable[["ArrowPrepared"], None]


def data_cache_dir() -> Path:
    """Where ``lora-ops train`` keeps prepared sets: ``<cache_dir>/datasets``, beside the
    base models' ``<cache_dir>/models``."""
    return get_settings().cache_dir / "datasets"


def train_from_files(  # noqa: PLR0913 - the command's options, each a keyword
    base: str | Path,
    data_path: Path,
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    hooks: TrainingHooks | None = None,
    progress: bool = True,
    validation_path: Path | None = None,
    data_cache: Path | None = None,
    on_data: DataReport | None = None,
) -> TrainResult:
    """Base name or folder + JSONL, Parquet or CSV file -> adapter folder: ``lora-ops train``.

    The data is checked in full before the model is loaded, so bad data fails in seconds
    and leaves nothing behind, in the cache either. ``validation_path`` holds the held-out
    examples instead of a share of the data file. ``data_cache`` is the folder of prepared
    sets (default :func:`data_cache_dir`); ``on_data`` is told what was prepared or found
    there, before the model loads. Under ``torchrun`` the processes train data-parallel
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
    cache = Path(data_cache) if data_cache is not None else data_cache_dir()
    with distributed.process_group():
        job = _job_from_files(base, data_path, config, out_dir, validation_path, cache, on_data)
        return train_adapter(
            replace(job, resume=resume, hooks=hooks or TrainingHooks(), progress=progress)
        )


def _job_from_files(
    base: str | Path,
    data_path: Path,
    config: TrainConfig,
    out_dir: Path,
    validation_path: Path | None,
    cache: Path,
    on_data: DataReport | None,
) -> TrainingJob:
    """The job ``train_from_files`` runs, its hooks and resume flag aside."""
    # Imported here: base_models pulls in the tokenizer stack, and this keeps the loop
    # importable by callers that bring their own tokenized examples.
    from lora_ops import base_models

    with distributed.main_first():  # one process fills the model cache, the others read it
        folder = base_models.resolve_base(base)
    base_models.check_lora_fits(folder, config.lora)
    tokenizer = base_models.load_tokenizer(folder)
    dataset = prepare_shared(data_path, tokenizer, config, cache, validation_path)
    if on_data is not None:
        on_data(dataset)
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


def prepare_shared(
    data_path: Path,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    cache: Path,
    validation_path: Path | None = None,
) -> ArrowPrepared:
    """The file's prepared set in ``cache``, made by rank 0 alone under ``torchrun``.

    Rank 0 checks and tokenizes the file (or finds it cached) while the others wait; they
    then check the file themselves and find rank 0's entry, a cache hit. So the processes
    of one run never tokenize twice or write one entry at once, and ranks whose machine
    does not share rank 0's cache folder still prepare their own. Bad data fails on rank 0,
    and torchrun stops the waiting ranks with it.

    Raises:
        DataError: Every problem in the file(s), by file and line.
        InputError: A file cannot be read, or eval_fraction is out of range.
    """
    from lora_ops.data.arrow_prepare import PrepareSettings, prepare_cached

    settings = PrepareSettings(max_seq_len=config.max_seq_len, eval_fraction=config.eval_fraction)
    held_out = Path(validation_path) if validation_path is not None else None
    with distributed.main_first():
        return prepare_cached(Path(data_path), tokenizer, cache, settings, validation_path=held_out)
