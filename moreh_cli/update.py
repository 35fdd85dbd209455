"""update-moreh: update, roll back or repair the MoAI Platform software of this front.

    update-moreh                    update to the version the cluster's master runs
    update-moreh --target VERSION   install that version (an update or a roll-back)
    update-moreh --force            reinstall the platform and its PyTorch build, e.g. after
                                    `pip install -r requirements.txt` replaced torch
    update-moreh --check            only report the versions; change nothing

Packages come through pip as configured on this machine (its index or mirror); ``--source DIR``
installs from a directory of wheels instead, for fronts without network. A platform installed
from a source checkout is reinstalled from that checkout. Every change ends by reinstalling the
start-up hook, which records the torch build it was installed against.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from moreh_cli import common
from offload import hook, platform_check

DISTRIBUTION = "moai-platform"


@dataclass
class Installed:
    platform: str
    torch: str | None
    torch_problem: str | None
    hook_installed: bool
    source: Path | None      # the checkout the platform is installed from, if any
    editable: bool


def local_source() -> tuple[Path | None, bool]:
    """The directory the platform was installed from, and whether editable; (None, False) when
    it came from an index or a wheel."""
    try:
        direct_url = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        direct_url = None
    if direct_url:
        info = json.loads(direct_url)
        url = urlparse(info.get("url", ""))
        if url.scheme == "file" and "dir_info" in info and Path(unquote(url.path)).is_dir():
            return Path(unquote(url.path)), bool(info["dir_info"].get("editable"))
    # The code running now lives in a checkout (run from the source tree, or a stale install).
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists():
        return checkout, True
    return None, False


def inspect_install() -> Installed:
    torch_version = hook.installed_torch_version()
    if torch_version is None:
        problem = f"PyTorch is not installed; the MoAI Platform needs torch {platform_check.PINNED_TORCH}"
    else:
        site_dir = Path(str(importlib.metadata.distribution("torch").locate_file("")))
        try:
            problem = platform_check.problem(torch_version, site_dir)
        except platform_check.PlatformMismatch as e:
            problem = str(e)
    source, editable = local_source()
    return Installed(common.client_version(), torch_version, problem,
                     hook.installed(hook.default_site_dir()), source, editable)


def latest_version() -> str:
    settings = common.load_settings()
    master = common.MasterConnection(settings, settings.user_token())
    try:
        return master.call("hello")["server_version"]
    except common.ToolError as e:
        raise common.ToolError(f"{e}; or name the version with --target VERSION") from None
    finally:
        master.close()


def report(installed: Installed, target: str, target_named: bool) -> list[str]:
    torch_state = "ok" if installed.torch_problem is None else "NOT the platform's build"
    hook_state = "installed" if installed.hook_installed else "NOT installed"
    return [f"Current Version: {installed.platform}  {'Target' if target_named else 'Latest'} Version: {target}",
            f"PyTorch: {installed.torch or '-'} ({torch_state})",
            f"Offload hook: {hook_state}"]


def pip_commands(installed: Installed, target: str, force: bool, source_dir: Path | None) -> list[list[str]]:
    """The installs that bring this front to ``target`` (none when it is there already)."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if source_dir is not None:
        pip += ["--no-index", "--find-links", str(source_dir)]
    reinstall = ["--force-reinstall", "--no-deps"] if force else []
    commands = []
    if force or installed.torch_problem is not None:
        commands.append(pip + reinstall + [f"torch=={platform_check.PINNED_TORCH}"])
    if force or target != installed.platform:
        if installed.source is None:
            spec = [f"{DISTRIBUTION}=={target}"]
        elif target != installed.platform:
            raise common.ToolError(
                f"the platform is installed from the source checkout {installed.source} (version "
                f"{installed.platform}); check out {target} there, then run `update-moreh --force`")
        else:
            spec = ["-e", str(installed.source)] if installed.editable else [str(installed.source)]
        commands.append(pip + reinstall + spec)
    return commands


def run_step(cmd: list[str], dry_run: bool):
    print(("would run: " if dry_run else "+ ") + shlex.join(cmd), flush=True)
    if dry_run:
        return
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise common.ToolError(f"the step above failed (exit status {rc}); the steps before it were "
                               "applied, run `update-moreh --force` once the problem is fixed")


def update(args):
    installed = inspect_install()
    target = args.target or latest_version()
    print("\n".join(report(installed, target, args.target is not None)))
    if installed.torch_problem is not None:
        print(installed.torch_problem)
    commands = pip_commands(installed, target, args.force, args.source)
    if not commands and installed.hook_installed:
        print("The MoAI Platform is up to date.")
        return
    if args.check:
        repair = " --force" if installed.torch_problem else ""
        print(f"Run `update-moreh{repair}` to bring the MoAI Platform to version {target}.")
        return
    for cmd in commands:
        run_step(cmd, args.dry_run)
    run_step([sys.executable, "-m", "offload.hook", "install"], args.dry_run)
    if not args.dry_run:
        print(f"The MoAI Platform {target} is installed with torch {platform_check.PINNED_TORCH}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="update-moreh", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    parser.add_argument("--target", metavar="VERSION", help="the platform version to install")
    parser.add_argument("--force", action="store_true", help="reinstall even what looks right")
    parser.add_argument("--check", action="store_true", help="report only; change nothing")
    parser.add_argument("--source", type=Path, metavar="DIR", help="install from this wheel directory")
    parser.add_argument("--dry-run", action="store_true", help="print the install commands only")
    args = parser.parse_args(argv)
    return common.run_tool("update-moreh", lambda: update(args))


if __name__ == "__main__":
    sys.exit(main())
