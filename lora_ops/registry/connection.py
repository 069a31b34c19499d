"""The connection to one MLflow installation that every part of the registry shares.

Every call goes through an explicit ``MlflowClient(tracking_uri, registry_uri)``: nothing
in the registry reads or sets MLflow's global tracking URI or active run, so two
registries (or two Prefect tasks in threads) never meet.
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import mlflow
from mlflow.exceptions import MlflowException

from lora_ops.errors import LoraOpsError
from lora_ops.settings import get_settings


class RegistryUnavailable(LoraOpsError):
    """The MLflow server could not be reached (down, restarting, or the network)."""


class ArtifactsUnavailable(LoraOpsError):
    """MLflow could not hand out a run's or model's files."""


# Words requests/urllib3 use when no answer came at all, as opposed to an answer saying no.
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish", "timed out")


class _ClearErrors:
    """An MlflowClient whose calls fail with "MLflow at URL is unreachable" when the server
    does not answer, instead of a page of urllib3 text; everything else passes through."""

    def __init__(self, client: mlflow.MlflowClient, tracking_uri: str) -> None:
        self._client = client
        self._tracking_uri = tracking_uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except MlflowException as exc:
                if not any(words in str(exc) for words in _UNREACHABLE):
                    raise
                raise RegistryUnavailable(
                    f"MLflow at {self._tracking_uri} is unreachable ({name} failed); "
                    "is the tracking server running?"
                ) from exc

        return call


class Connection:
    """One MLflow installation: its URI, where new experiments keep artifacts, the client.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI; default
            ``Settings.mlflow_tracking_uri`` (``MLFLOW_TRACKING_URI``).
        artifact_root: where new experiments keep their artifacts
            (``<root>/<customer>``). Unset: the server decides, except for a
            ``sqlite:///`` store, whose artifacts go to ``mlartifacts/`` beside the database
            file (MLflow's own default is ``./mlruns`` under whatever the working folder is).
    """

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri or get_settings().mlflow_tracking_uri
        self.artifact_root = artifact_root or _default_artifact_root(self.tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.client = cast(mlflow.MlflowClient, _ClearErrors(client, self.tracking_uri))

    def check_reachable(self, timeout_s: float = 3.0) -> None:
        """Raise ``RegistryUnavailable`` at once when the tracking server does not answer.

        MLflow's client retries a dead server for minutes, a warning a try; a caller that
        has something better to do meanwhile (a replica serving its base model) asks this
        first. Stores that are not servers (``sqlite:///``, folders) are always reachable.
        """
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"answered {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"answered {exc.code}"
        except (OSError, ValueError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise RegistryUnavailable(f"MLflow at {self.tracking_uri} is unreachable ({problem})")

    @contextmanager
    def _artifact_errors_explained(self, what: str) -> Iterator[None]:
        """MLflow reports an artifact store it cannot reach as a wrong path; say both."""
        try:
            yield
        except RegistryUnavailable:
            raise
        except MlflowException as exc:
            raise ArtifactsUnavailable(
                f"MLflow at {self.tracking_uri} could not serve {what}: {exc.message} (when "
                "the path is right, its artifact store, S3, is down or refusing access)"
            ) from exc


def _default_artifact_root(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith("sqlite:///") or ":memory:" in tracking_uri:
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (database.parent / "mlartifacts").as_uri()
