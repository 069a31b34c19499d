"""The retrain's data step: a customer's data file (and validation file) checked, tokenized
into an Arrow set and stored in S3 by content, handed on as a ``DatasetRef``.

Re-exported by ``lora_ops.pipeline``, whose steps (and the flows' tasks) use it from there.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lora_ops import base_models, data, names
from lora_ops.data.scan import examples_at
from lora_ops.errors import InputError
from lora_ops.settings import Settings, get_settings
from lora_ops.storage import MANIFEST, Storage

if TYPE_CHECKING:  # only for hints: the pipeline imports this module at start-up
    from transformers import PreTrainedTokenizerBase

    from lora_ops.data import arrow_prepare
    from lora_ops.data.arrow_store import ArrowPrepared

PREPARED_MANIFEST = "prepared.json"  # arrow_store's, named here without importing datasets

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.json"
SAMPLE_PROMPTS = 4


@dataclass(frozen=True)
class DatasetRef:
    """A prepared dataset in S3."""

    customer: str
    sha256: str
    uri: str  # s3:// prefix of the tokenized folder
    prompts_uri: str
    base: str
    train_size: int
    eval_size: int
    validation_data_uri: str | None = None  # held-out examples' file, instead of a split


def fetch_data(data_uri: str, dst: Path, storage: Storage, field: str = "data_uri") -> Path:
    """A local copy of a data file (``field`` names it): the path itself, or a download
    (named with the URI's suffix, which says whether it is JSONL, Parquet or CSV)."""
    if data_uri.startswith("s3://"):
        suffix = PurePosixPath(data_uri).suffix.lower()
        local = dst / f"{field}{suffix if suffix in ('.parquet', '.pq', '.csv') else '.jsonl'}"
        storage.download_file(data_uri, local)
        return local
    path = Path(data_uri).expanduser()
    if not path.is_file():
        raise InputError("no such file", file=data_uri, field=field)
    return path


def fetch_validation(uri: str | None, dst: Path, storage: Storage) -> Path | None:
    """A local copy of the validation file, if there is one."""
    return None if uri is None else fetch_data(uri, dst, storage, "validation_data_uri")


def prepare_data(
    customer: str,
    data_uri: str,
    base: str,
    max_seq_len: int,
    eval_fraction: float,
    settings: Settings | None = None,
    validation_data_uri: str | None = None,
) -> DatasetRef:
    """Check and tokenize the data; store it under ``datasets/<customer>/<sha256>/``.

    The file is read once, streaming (JSONL, Parquet or CSV). The same content (whatever
    its file name, format or JSON formatting) with the same tokenizer and settings maps to
    the same folder, ``arrow-<key>/`` (:func:`~lora_ops.data.arrow_prepare.cache_key`), and
    is reused without tokenizing anything. Bad data raises before anything is written.
    With ``validation_data_uri`` that file's examples are held out instead of a share of
    the data, and the sha256 covers both files.
    """
    from lora_ops.data import arrow_prepare  # datasets and pyarrow: only where data is prepared

    names.check_customer(customer)
    settings = settings or get_settings()
    storage = Storage.from_settings(settings)
    folder = base_models.resolve_base(base)
    tokenizer = base_models.load_tokenizer(folder)
    options = arrow_prepare.PrepareSettings(max_seq_len=max_seq_len, eval_fraction=eval_fraction)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        local = fetch_data(data_uri, work, storage)
        validation = fetch_validation(validation_data_uri, work, storage)
        staged = arrow_prepare.stage(
            local, tokenizer, options, work, validation_path=validation, source=data_uri
        )
        root = names.s3_uri(settings.bucket, names.dataset_prefix(customer, staged.sha256))
        tokenized_uri = f"{root}arrow-{staged.key[:16]}/"
        prompts_uri = root + PROMPTS_FILE
        if storage.exists(tokenized_uri + MANIFEST) and storage.exists(prompts_uri):
            sizes = storage.read_json(tokenized_uri + PREPARED_MANIFEST)["sizes"]
            log.info("dataset %s already prepared at %s: reusing it", staged.sha256, root)
        else:
            sizes = _build_and_store(
                staged, tokenizer, options, storage, tokenized_uri, prompts_uri
            )
    return DatasetRef(
        customer=customer,
        sha256=staged.sha256,
        uri=tokenized_uri,
        prompts_uri=prompts_uri,
        base=base_models.base_name(folder),
        train_size=sizes["train"],
        eval_size=sizes["eval"],
        validation_data_uri=validation_data_uri,
    )


def _build_and_store(
    staged: arrow_prepare.Staged,
    tokenizer: PreTrainedTokenizerBase,
    options: arrow_prepare.PrepareSettings,
    storage: Storage,
    tokenized_uri: str,
    prompts_uri: str,
) -> dict[str, int]:
    """Tokenize the staged examples into Arrow, upload the set and sample prompts; the sizes."""
    from lora_ops.data import arrow_prepare, arrow_store

    out = staged.files[0].staging.parent / "prepared"
    arrow_prepare.build(staged, tokenizer, options, out)
    dataset = arrow_store.load_arrow(out)
    storage.write_json(prompts_uri, _sample_prompts(dataset, staged.files[-1].path))
    storage.upload_dir(out, tokenized_uri, progress=False)
    log.info(
        "prepared %s: %d train, %d eval examples, sha256 %s",
        staged.source,
        len(dataset.train),
        len(dataset.eval),
        staged.sha256,
    )
    return {"train": len(dataset.train), "eval": len(dataset.eval)}


def _sample_prompts(dataset: ArrowPrepared, held_out_file: Path) -> list[dict[str, Any]]:
    """The first held-out examples as prompts and references, read back from their file
    (the file the eval rows came from: the data, or the validation file)."""
    lines = [item.line for item in dataset.eval[:SAMPLE_PROMPTS]]
    return [
        {"messages": data.prompt_of(e), "reference": data.reference_reply(e)}
        | ({"tools": list(e.tools)} if e.tools else {})
        for e in examples_at(held_out_file, lines)
    ]
