"""Switch the offload layer on in this process: from here on ``cuda:0`` is the virtual device.

Called by offload/autostart.py right after ``import torch`` (the ``.pth`` hook or ``moai run``).
Every step only patches or registers things inside torch; the session connects to the master on
the first operation that needs the device, so a program that never touches ``cuda`` holds no GPU
and opens no socket.
"""
from __future__ import annotations

from offload import (autocast, backward_failures, cuda_facade, device, device_mapping, device_messages,
                     dispatch, distributed, eager_compile, flop_formulas, graph_export,
                     optimizer_params, profiler, remote_backward, serialization, torch_settings,
                     torchscript)

_active = False


def activate():
    """Idempotent: the second and later calls change nothing."""
    global _active
    if _active:
        return
    # The device must exist before the patches below name it (map_device, autocast's backend).
    device.register()
    device_mapping.install()
    device_messages.install()
    cuda_facade.install()
    autocast.install()
    serialization.install()
    torchscript.install()
    dispatch.install_upload_hints()
    optimizer_params.install()
    backward_failures.install()   # before remote_backward wraps the hook registrations too
    remote_backward.install()
    eager_compile.install()
    graph_export.install()
    flop_formulas.install()
    torch_settings.install()
    distributed.install()
    profiler.install()
    _active = True


def is_active() -> bool:
    return _active
