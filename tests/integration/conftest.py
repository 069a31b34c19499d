"""Integration tests share the session's stack (tests/conftest.py) and these helpers."""

from tests.servers import (  # noqa: F401 - imported by test modules from here
    OUTSIDE_VARIABLES,
    RunningStack,
    free_port,
    free_ports,
    stack_settings,
)
