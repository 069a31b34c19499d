"""Customer training data: checked examples, tokenized and masked, split, prepared on disk.

* :mod:`~lora_ops.data.examples`: a JSONL file read line by line, every problem with its
  file:line; the canonical form and the content hash.
* :mod:`~lora_ops.data.messages`: one message checked by role (weight, tool calls and
  results included); :mod:`~lora_ops.data.tools`: tools, calls and answers checked;
  :mod:`~lora_ops.data.fields`: the field checks both share.
* :mod:`~lora_ops.data.tokenize`: the chat rendered (tools too), loss on trained assistant
  turns only.
* :mod:`~lora_ops.data.split`: train/eval by content hash.
* :mod:`~lora_ops.data.validation`: a whole file checked, token counts, the report.
* :mod:`~lora_ops.data.prepared`: validate, tokenize and split a file; save and load the result.
* :mod:`~lora_ops.data.sources`: JSONL lines, Parquet rows and CSV rows read one at a time;
  :mod:`~lora_ops.data.scan`: a file checked in one streaming pass (hash, duplicates, split).
* :mod:`~lora_ops.data.arrow_prepare`, :mod:`~lora_ops.data.arrow_tokenize`,
  :mod:`~lora_ops.data.arrow_store`: data at scale with Hugging Face ``datasets``: tokenized
  by ``map`` into Arrow, cached by content, loaded memory-mapped and checked. They import
  ``datasets`` and pyarrow, so nothing here imports them: callers import them lazily.

The names the old single module had are re-exported here; saving and loading a prepared
dataset are :mod:`lora_ops.data.prepared`'s own (``prepared.save_prepared``). No module here
imports torch or transformers (a tokenizer is passed in), so importing the package stays
cheap and ``lora-ops data validate`` answers a broken file before loading either.
"""

from lora_ops.data.examples import (
    MAX_LINE_BYTES,
    ROLES,
    DataError,
    Example,
    Message,
    Role,
    dataset_sha256,
    is_trained,
    json_type_name,
    parse_examples,
    prompt_of,
    read_examples,
    reference_reply,
)
from lora_ops.data.prepared import PreparedDataset, prepare_dataset
from lora_ops.data.split import split_examples
from lora_ops.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from lora_ops.data.validation import MIN_EXAMPLES, ValidationReport, validate_file

__all__ = [
    "IGNORE_INDEX",
    "MAX_LINE_BYTES",
    "MIN_EXAMPLES",
    "ROLES",
    "DataError",
    "Example",
    "Message",
    "PreparedDataset",
    "Role",
    "TokenizedExample",
    "ValidationReport",
    "dataset_sha256",
    "is_trained",
    "json_type_name",
    "parse_examples",
    "prepare_dataset",
    "prompt_of",
    "read_examples",
    "reference_reply",
    "split_examples",
    "tokenize_example",
    "validate_file",
]
