"""Registry: every customer's runs and adapter versions in one MLflow installation.

The one object the rest of lora-ops holds of MLflow. It is made of the parts, each usable
alone on the same arguments: :class:`~lora_ops.registry.tracking.TrainingRuns` (runs) and
:class:`~lora_ops.registry.versions.AdapterVersions` (versions, aliases, files), over one
:class:`~lora_ops.registry.connection.Connection` (the client they share).
"""

from __future__ import annotations

from lora_ops.registry.tracking import TrainingRuns
from lora_ops.registry.versions import AdapterVersions


class Registry(TrainingRuns, AdapterVersions):
    """Runs and registered adapter versions of every customer in one MLflow installation.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI; default
            ``Settings.mlflow_tracking_uri`` (``MLFLOW_TRACKING_URI``).
        artifact_root: where new experiments keep their artifacts
            (``<root>/<customer>``). Unset: the server decides, except for a
            ``sqlite:///`` store, whose artifacts go to ``mlartifacts/`` beside the database
            file (MLflow's own default is ``./mlruns`` under whatever the working folder is).
    """
