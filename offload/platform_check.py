"""Is the torch in this environment the platform's build? If not, say how to repair it.

The virtual device relies on the pinned torch build (its PrivateUse1 Python backend, dispatcher
keys and internals patched by the offload layer). ``python -m offload.hook install`` records the
exact version it was installed against; a later ``pip install -r requirements.txt`` that replaces
torch is caught here, before the layer touches the new torch.
"""
from __future__ import annotations

import json
from pathlib import Path

# The build the platform is released with (Makefile TORCH_SPEC, images, update-moreh).
PINNED_TORCH = "2.13.0"
RECORD_NAME = "moai-offload.json"
REPAIR_HINT = "run `update-moreh --force` to reinstall the platform's PyTorch"


class PlatformMismatch(RuntimeError):
    """The installed torch is not the one the platform was installed with."""


def record(site_dir: Path, torch_version: str):
    (site_dir / RECORD_NAME).write_text(json.dumps({"torch": torch_version}) + "\n")


def recorded_version(site_dir: Path) -> str | None:
    path = site_dir / RECORD_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["torch"]
    except (ValueError, KeyError, TypeError):
        raise PlatformMismatch(f"{path} is damaged; {REPAIR_HINT}") from None


def problem(torch_version: str, site_dir: Path | None = None) -> str | None:
    """Why ``torch_version`` cannot run the platform, or None when it can."""
    expected = recorded_version(site_dir) if site_dir is not None else None
    if expected is None:
        expected = PINNED_TORCH
        found = torch_version.split("+", 1)[0]
    else:
        found = torch_version
    if found == expected:
        return None
    return (f"PyTorch {torch_version} is installed, but the MoAI Platform needs its own build "
            f"(torch {expected}); the accelerator cannot be used with this version. {REPAIR_HINT}.")


def check(torch_version: str, site_dir: Path | None = None):
    message = problem(torch_version, site_dir)
    if message:
        raise PlatformMismatch(message)
