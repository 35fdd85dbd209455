"""Front-side helpers: a user's shell environment for subprocesses, isolated in a temp dir.

``PYTHONUSERBASE`` points the interpreter's user site-packages into the temp dir, so
``python -m offload.hook install --user`` there tests the real start-up mechanism (Python
processes the ``.pth`` of its user site at every start) without touching this machine's
site-packages.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# A master address nothing listens on: activation must not need the network.
NOWHERE = "tcp://127.0.0.1:9"


def user_env(root: Path, base: dict | None = None, **extra: str) -> dict:
    """A user's environment with the user site under ``root``: ``base`` (a cluster's user
    environment) or else this process's, without MOAI_* settings and with a HOME of its own (no
    ~/.moai token)."""
    if base is None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
        base.update(PYTHONPATH=str(REPO_ROOT), HOME=str(root / "home"))
    return {**base, "PYTHONUSERBASE": str(root / "userbase"), **extra}


def python(env: dict, *args: str, cwd: Path | None = None, timeout_s: float = 120.0,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout_s)


def install_user_hook(env: dict):
    out = python(env, "-m", "offload.hook", "install", "--user")
    assert out.returncode == 0, out.stderr
    return out
