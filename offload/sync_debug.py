"""``torch.cuda.set_sync_debug_mode`` on the virtual device.

CUDA's sync debug mode warns about, or refuses, each operation that makes the program wait for the
device without asking to: ``.item()``, a copy to the host, an op whose result's shape depends on
the data (``nonzero``, boolean indexing). The same operations wait here, for the workers; they
call ``check()``. ``torch.cuda.synchronize()``, an explicit wait, is not reported, as on CUDA.
"""
from __future__ import annotations

import warnings

MESSAGE = "called a synchronizing CUDA operation"
_MODES = {"default": 0, "warn": 1, "error": 2}
mode = 0


def set_mode(debug_mode: int | str) -> None:
    global mode
    if isinstance(debug_mode, str):
        if debug_mode not in _MODES:
            raise RuntimeError("invalid value of debug_mode, expected one of `default`, `warn`, `error`")
        debug_mode = _MODES[debug_mode]
    mode = min(max(int(debug_mode), 0), 2)


def get_mode() -> int:
    return mode


def check() -> None:
    """At a wait the program did not ask for: CUDA's warning or error, as the mode says."""
    if mode == 0:
        return
    if mode == 1:
        warnings.warn(MESSAGE, stacklevel=3)
    elif mode == 2:
        raise RuntimeError(MESSAGE)
