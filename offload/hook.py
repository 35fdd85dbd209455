"""The start-up hook that lets an unmodified ``python train.py`` use the virtual device.

    python -m offload.hook install [--user | --site-dir DIR]
    python -m offload.hook uninstall [--user | --site-dir DIR]
    python -m offload.hook status [--user | --site-dir DIR]

``install`` writes ``moai-offload.pth`` into a site-packages directory (default: this interpreter's
environment). Python runs its one ``import`` line at every start; it imports offload.autostart,
which costs microseconds and only watches for ``import torch`` (the decision to activate is taken
there, see that module). It also records the torch version the platform was installed against, so
a later ``pip install`` that replaces torch is caught (offload/platform_check.py).

The hook must never stop Python from starting: whatever goes wrong while importing the watcher is
one line on stderr, and a hook left behind after the platform was uninstalled stays silent.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import site
import sys
import sysconfig
from pathlib import Path

from offload import platform_check

PTH_NAME = "moai-offload.pth"
# A .pth runs only lines that start with "import", one line each: the guarded import is exec'd.
HOOK_CODE = '''\
try:
    import offload.autostart
except ModuleNotFoundError as e:
    if e.name != "offload":
        sys.stderr.write(f"moai: offload hook disabled ({e}); repair with `update-moreh --force`\\n")
except Exception as e:
    sys.stderr.write(f"moai: offload hook disabled ({type(e).__name__}: {e})\\n")
'''
PTH_LINE = f"import sys; exec({HOOK_CODE!r})\n"


def default_site_dir(user: bool = False) -> Path:
    """This environment's site-packages (a venv's own when run from one), or the user site."""
    return Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])


def installed_torch_version() -> str | None:
    # From the package metadata: importing torch here would run the very hook being managed.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def install(site_dir: Path) -> Path:
    site_dir.mkdir(parents=True, exist_ok=True)
    pth = site_dir / PTH_NAME
    pth.write_text(PTH_LINE)
    torch_version = installed_torch_version()
    if torch_version is not None:
        platform_check.record(site_dir, torch_version)
    return pth


def uninstall(site_dir: Path) -> list[Path]:
    removed = []
    for name in (PTH_NAME, platform_check.RECORD_NAME):
        path = site_dir / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def installed(site_dir: Path) -> bool:
    pth = site_dir / PTH_NAME
    return pth.exists() and pth.read_text() == PTH_LINE


def activation_state(env=os.environ) -> str:
    """Whether a new Python process here would activate the layer, and why (for people)."""
    from offload.autostart import ENABLE_ENV, should_activate

    flag = env.get(ENABLE_ENV, "")
    if flag in ("0", "1"):
        return f"{'on' if flag == '1' else 'off'} ({ENABLE_ENV}={flag})"
    if should_activate(env):
        return "on (a user token is configured)"
    return "off (no user token: set MOAI_TOKEN or write it to the token file)"


def status_lines(site_dir: Path, env=os.environ) -> list[str]:
    pth = site_dir / PTH_NAME
    if installed(site_dir):
        recorded = platform_check.recorded_version(site_dir)
        hook = f"installed ({pth}; torch {recorded or 'not installed'} recorded)"
    elif pth.exists():
        hook = f"outdated ({pth}); run `python -m offload.hook install`"
    else:
        hook = f"not installed in {site_dir}"
    return [f"offload hook: {hook}", f"cuda:0 in new Python processes: {activation_state(env)}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload.hook", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("install", "uninstall", "status"))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="the user site-packages (no root needed)")
    where.add_argument("--site-dir", type=Path, help="a site-packages directory of your choice")
    args = parser.parse_args(argv)
    site_dir = args.site_dir or default_site_dir(args.user)
    try:
        if args.command == "install":
            print(f"installed {install(site_dir)}")
        elif args.command == "uninstall":
            removed = uninstall(site_dir)
            print("\n".join(f"removed {p}" for p in removed) or f"no hook in {site_dir}")
        else:
            print("\n".join(status_lines(site_dir)))
            return 0 if installed(site_dir) else 1
    except (OSError, ValueError, platform_check.PlatformMismatch) as e:
        hint = "; try --user" if isinstance(e, PermissionError) else ""
        print(f"offload.hook: {e}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
