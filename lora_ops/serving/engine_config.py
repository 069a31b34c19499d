"""How an engine serves: its base model, and the limits that keep a replica responsive."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from lora_ops.errors import InputError


@dataclass(frozen=True)
class EngineConfig:
    """How an engine serves: its base model, and the limits that keep a replica responsive.

    Args:
        base: catalogue name or transformers folder of the base model.
        max_adapters: adapters kept in memory at once (least recently used go first).
        max_adapter_bytes: byte budget for the adapters kept in memory.
        max_batch_size: most requests running at once.
        max_queue: most requests waiting to run; more are refused (:class:`Overloaded`).
        max_requests_per_model: most requests one model (a customer's adapter, or the
            base) may have waiting and running; more are refused (:class:`Overloaded`).
        max_model_len: most tokens (prompt + completion) of one request; at most, and by
            default, the base model's context length.
        kv_cache_tokens: tokens the KV cache holds, shared by the running requests
            (default: the larger of ``max_model_len`` and 1,024 per batch row).
        prefill_chunk_tokens: most prompt tokens computed in one step.
        prefix_caching: reuse the keys and values of prompt blocks seen before.
        adapter_roots: folders local adapters must lie in; ``None`` accepts any folder
            (in-process use), an empty sequence none (``lora-ops serve`` passes its roots).
        bucket: the one S3 bucket adapters may come from (default: the settings' bucket).
        work_dir: where fetched adapter files are kept while they load.
    """

    base: str | Path
    max_adapters: int = 1024
    max_adapter_bytes: int | None = 2 * 1024**3
    max_batch_size: int = 16
    max_queue: int = 256
    max_requests_per_model: int = 128
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    prefill_chunk_tokens: int = 512
    prefix_caching: bool = True
    adapter_roots: Seq[Path] | None = None
    bucket: str | None = None
    work_dir: Path | None = None


def context_length(model: object, wanted: int | None) -> int:
    """``wanted``, or the model's own context length, which it may not exceed."""
    config = getattr(model, "config", None)
    limit = int(getattr(config, "max_position_embeddings", 0) or 2048)
    if wanted is None:
        return limit
    if not 1 < wanted <= limit:
        raise InputError(f"must be between 2 and the model's {limit}", field="max_model_len")
    return wanted
