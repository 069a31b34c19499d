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

    Built as :class:`~lora_ops.registry.connection.Connection` is (``tracking_uri``,
    ``artifact_root``).
    """
