"""Nothing leaves the machine: the switches that keep our dependencies off the network.

``engine/__init__.py`` applies them when the engine package is first imported, so every process of
ours (the ``prt`` CLI, the window, the ``prt tune`` / ``prt library build`` processes it starts, the
tests) has them set before any dependency initializes; child processes inherit them. They are set,
not defaulted: a variable left in the user's environment cannot turn telemetry back on.

tests/test_egress.py watches the real processes at the OS level to prove it.
"""

from __future__ import annotations

import os

OFFLINE_ENVIRONMENT = {
    # onnxruntime >= 1.31 starts 1DS telemetry on Linux and macOS (DNS lookups of a Microsoft events host,
    # a device id and a queue of events under ~/.cache/Microsoft) unless this is set before it initializes;
    # onnxruntime.disable_telemetry_events() after the import does not stop it.
    "ORT_DISABLE_TELEMETRY": "1",
}


def apply_offline_environment() -> None:
    os.environ.update(OFFLINE_ENVIRONMENT)
