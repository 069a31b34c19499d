"""Where a replica may take adapters from, and fetching them into a private folder.

An admin names an adapter's location in ``lora_path``; the replica serves whatever it
reads there to every caller of that name, so the location is confined:

- a local folder must resolve (symlinks followed) inside one of the configured roots,
  and so must each file read from it; with no roots configured local folders are refused;
- ``s3://`` must be in the replica's own bucket;
- ``models:/adapter-<customer>/<version>`` (or ``@<alias>``) may only be served under
  the name ``<customer>`` (or ``<customer>:staged`` while a deploy smoke-tests it), so one
  customer's version never answers for another.

Every fetch copies the files into a fresh folder of the engine's own before their
checksum is taken, so what is verified is exactly what is loaded.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_ops import names
from lora_ops.errors import InputError, LoraOpsError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_MODELS_URI = re.compile(
    r"models:/adapter-(?P<customer>[a-z0-9][a-z0-9-]{0,62})"
    r"(?:/(?P<version>\d{1,9})|@(?P<alias>[a-z][a-z0-9_-]{0,62}))"
)


class SourceUnavailable(LoraOpsError):
    """The object store or registry holding an adapter could not be read just now."""


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter comes from, so an evicted one can be loaded back."""

    uri: str  # a local folder, s3://..., or models:/adapter-<customer>/<version> (or @alias)
    expected_sha256: str | None = None


class SourcePolicy:
    """Which adapter locations a replica accepts.

    Args:
        roots: folders local adapters must lie in. ``None`` accepts any local folder
            (a trusted in-process caller); an empty sequence refuses every local folder.
        bucket: the only S3 bucket adapters may come from.
    """

    def __init__(self, roots: Sequence[Path] | None, bucket: str) -> None:
        self.roots = None if roots is None else [Path(r).resolve() for r in roots]
        self.bucket = bucket

    def check(self, name: str, uri: str) -> None:
        """Refuse ``uri`` for adapter ``name`` unless this replica may load it from there.

        Raises:
            InputError: naming the path and why it is refused.
        """
        if uri.startswith("s3://"):
            bucket, _ = names.parse_s3_uri(uri)
            if bucket != self.bucket:
                raise InputError(
                    f"{uri}: only the bucket {self.bucket!r} is served here", field="lora_path"
                )
        elif uri.startswith("models:/"):
            match = _MODELS_URI.fullmatch(uri)
            if match is None:
                raise InputError(
                    f"{uri}: expected models:/adapter-<customer>/<version> or @<alias>",
                    field="lora_path",
                )
            if name not in (match["customer"], names.staged_name(match["customer"])):
                raise InputError(
                    f"{uri} belongs to customer {match['customer']!r} and cannot be "
                    f"served as {name!r}",
                    field="lora_path",
                )
        else:
            self.confine(Path(uri), uri)

    def confine(self, path: Path, shown: str) -> Path:
        """``path`` resolved, if it lies inside a root; else InputError naming ``shown``."""
        if self.roots is not None and not self.roots:
            raise InputError(
                f"{shown}: local adapter folders are not served here "
                "(start the replica with --adapter-root DIR)",
                field="lora_path",
            )
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            raise InputError(f"{shown!r}: not a usable path", field="lora_path") from None
        if self.roots is not None and not any(resolved.is_relative_to(root) for root in self.roots):
            raise InputError(
                f"{shown}: outside the adapter roots of this replica", field="lora_path"
            )
        return resolved


def fetch(name: str, source: AdapterSource, policy: SourcePolicy, work_dir: Path) -> Path:
    """Copy adapter ``name``'s files from ``source`` into a new folder under ``work_dir``.

    The caller loads from the returned folder and then removes it.

    Raises:
        InputError: a refused location, missing files, or a pickle-only folder.
        SourceUnavailable: S3 or the registry could not be read.
    """
    policy.check(name, source.uri)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work_dir))
    try:
        if source.uri.startswith("s3://"):
            _download_s3(source.uri, target / "files")
            return target / "files"
        if source.uri.startswith("models:/"):
            return _download_model(source.uri, target / "files")
        _copy_local(source.uri, policy, target)
        return target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def discard(folder: Path, work_dir: Path) -> None:
    """Remove a folder :func:`fetch` made (the per-fetch folder right under ``work_dir``)."""
    if work_dir not in folder.parents:
        return  # never remove anything that is not the engine's own
    while folder.parent != work_dir:
        folder = folder.parent
    shutil.rmtree(folder, ignore_errors=True)


def _copy_local(uri: str, policy: SourcePolicy, target: Path) -> None:
    folder = policy.confine(Path(uri), uri)
    try:
        is_folder = folder.is_dir()
    except OSError:  # a name too long, a permission on the way
        is_folder = False
    if not is_folder:
        raise InputError("no such adapter folder", file=uri, field="lora_path")
    if not (folder / WEIGHTS).is_file():
        pickles = [p for p in PICKLES if (folder / p).exists()]
        hint = f" ({pickles[0]} is a pickle file and is never loaded)" if pickles else ""
        raise InputError(f"no {WEIGHTS} in the adapter folder{hint}", file=uri)
    for file_name in (CONFIG, WEIGHTS):
        if (folder / file_name).exists():
            # Each file is confined too: a symlink inside the folder may point anywhere.
            real = policy.confine(folder / file_name, f"{uri}/{file_name}")
            shutil.copyfile(real, target / file_name)


def _download_s3(uri: str, target: Path) -> None:
    from lora_ops.storage import Storage, StorageError

    try:
        Storage.from_settings().download_dir(uri, target)  # sha256 per file
    except InputError:
        raise
    except StorageError as exc:
        raise SourceUnavailable(f"{uri}: {exc}") from None


def _download_model(uri: str, target: Path) -> Path:
    from lora_ops.registry import Registry

    try:
        return Registry().download_adapter(uri, target)
    except LoraOpsError:
        raise
    except Exception as exc:  # MLflow's errors: only the registry module imports mlflow
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise InputError(f"{uri}: no such registered version", field="lora_path") from None
        raise SourceUnavailable(f"{uri}: the registry could not be read ({exc})") from None
