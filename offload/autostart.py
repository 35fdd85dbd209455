"""Run at interpreter start by the ``.pth`` line of ``python -m offload.hook install``.

Start-up must stay free, so this module imports nothing heavy and does not import torch: it puts a
one-shot finder on ``sys.meta_path`` that waits for ``import torch``. When torch has finished
importing, the finder decides (only then reading the settings) whether to activate the offload
layer: ``MOAI_OFFLOAD=0`` never, ``MOAI_OFFLOAD=1`` always (``moai run`` sets it), otherwise when a
user token is configured (``daemons.config``: ``MOAI_TOKEN``, the config file or the token file).
Not configured, the program gets stock torch. The platform's own daemons (``python -m daemons...``)
never activate: they share the machine, and often the token file, with the user's programs.

``run_program`` activates and then runs a program as ``__main__``: ``python -m offload SCRIPT|-m
MODULE ARGS...`` (offload/__main__.py), which ``moai run`` starts so that it needs no hook. Not
``-m offload.autostart``: with the hook installed this module is already imported at start-up.
"""
from __future__ import annotations

import os
import sys

ENABLE_ENV = "MOAI_OFFLOAD"


def is_platform_daemon() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_spec is not None and main_spec.name.startswith("daemons.")


def should_activate(env=os.environ) -> bool:
    if is_platform_daemon():
        return False
    flag = env.get(ENABLE_ENV, "")
    if flag in ("0", "1"):
        return flag == "1"
    from daemons import config
    return bool(config.load(env=env).user_token())


def activate_now():
    """Check the torch build, then switch the layer on (torch is imported by now)."""
    import torch
    from offload import platform_check
    from offload.activation import activate

    site_dir = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    from pathlib import Path
    platform_check.check(torch.__version__, Path(site_dir))
    activate()


class _TorchImportWatcher:
    """A meta-path finder that lets ``torch`` load normally, then activates the layer."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        import importlib.util  # here, not at the top: it costs every Python start ~20 ms

        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_torch = spec.loader.exec_module

        def exec_module(module):
            run_torch(module)
            if should_activate():
                activate_now()
        spec.loader.exec_module = exec_module
        return spec


def watch_for_torch():
    if sys.modules.get("torch") is not None:  # imported before us (unusual): activate at once
        if should_activate():
            activate_now()
        return
    if not any(isinstance(f, _TorchImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchImportWatcher())


def run_program(argv: list[str]):
    import runpy
    if not argv:
        raise SystemExit("usage: python -m offload SCRIPT|-m MODULE [ARGS...]")
    import torch  # noqa: F401  (activation follows the import, as the .pth hook would do it)
    if should_activate():
        activate_now()
    if argv[0] == "-m" and len(argv) > 1:
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


watch_for_torch()
