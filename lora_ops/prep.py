"""The retrain's data step: a customer's JSONL (and validation file) checked, tokenized and
stored in S3 by content, handed on as a ``DatasetRef``.

Re-exported by ``lora_ops.pipeline``, whose steps (and the flows' tasks) use it from there.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_ops import base_models, data, names
from lora_ops.data import prepared
from lora_ops.errors import InputError
from lora_ops.settings import Settings, get_settings
from lora_ops.storage import Storage

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
    """A local copy of a JSONL file (``field`` names it): the path itself, or a download."""
    if data_uri.startswith("s3://"):
        local = dst / f"{field}.jsonl"
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

    The same content (whatever its file name or JSON formatting) maps to the same folder
    and is reused. Bad data raises before anything is written. With
    ``validation_data_uri`` that file's examples are held out instead of a share of the
    data, and the sha256 covers both files.
    """
    names.check_customer(customer)
    settings = settings or get_settings()
    storage = Storage.from_settings(settings)
    folder = base_models.resolve_base(base)
    tokenizer = base_models.load_tokenizer(folder)
    with tempfile.TemporaryDirectory() as work:
        local = fetch_data(data_uri, Path(work), storage)
        validation = fetch_validation(validation_data_uri, Path(work), storage)
        dataset = data.prepare_dataset(
            local,
            tokenizer,
            max_seq_len=max_seq_len,
            eval_fraction=eval_fraction,
            source=data_uri,
            validation_path=validation,
        )
        root = names.s3_uri(settings.bucket, names.dataset_prefix(customer, dataset.sha256))
        tokenized_uri = f"{root}tokenized-{base_models.base_sha256(folder)[:12]}-{max_seq_len}/"
        prompts_uri = root + PROMPTS_FILE
        if storage.exists(tokenized_uri + "MANIFEST.json") and storage.exists(prompts_uri):
            log.info("dataset %s already prepared at %s: reusing it", dataset.sha256, root)
        else:
            prepared.save_prepared(dataset, Path(work) / "prepared")
            storage.write_json(prompts_uri, _sample_prompts(local, eval_fraction, validation))
            storage.upload_dir(Path(work) / "prepared", tokenized_uri, progress=False)
    return DatasetRef(
        customer=customer,
        sha256=dataset.sha256,
        uri=tokenized_uri,
        prompts_uri=prompts_uri,
        base=base_models.base_name(folder),
        train_size=len(dataset.train),
        eval_size=len(dataset.eval),
        validation_data_uri=validation_data_uri,
    )


def _sample_prompts(
    path: Path, eval_fraction: float, validation: Path | None
) -> list[dict[str, Any]]:
    if validation is not None:
        held_out = data.read_examples(validation)
    else:
        _, held_out = data.split_examples(data.read_examples(path), eval_fraction)
    return [
        {"messages": data.prompt_of(e), "reference": data.reference_reply(e)}
        | ({"tools": list(e.tools)} if e.tools else {})
        for e in held_out[:SAMPLE_PROMPTS]
    ]
