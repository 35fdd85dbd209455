"""moai: run a program on the virtual device, or see how this front is set up.

    moai run CMD [ARGS...]    run CMD with cuda:0 on the virtual device (MOAI_OFFLOAD=1)
    moai status               the start-up hook, the settings, the master and the current device

``moai run`` forces the layer on even where no token would switch it on by itself, and does not
need the hook: a Python command is started through ``python -m offload``, which activates the
layer before the program's first line. Other commands (a shell script that runs python) get only
the environment and rely on the hook (``python -m offload.hook install``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from offload import autostart, hook

PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?$")
# Interpreter options that come before the script; these two take a separate value.
OPTIONS_WITH_VALUE = ("-W", "-X")


def through_offload(cmd: list[str]) -> list[str]:
    """``python [OPTS] script|-m mod ARGS`` becomes ``python [OPTS] -m offload ...``;
    anything else (not Python, ``-c``, stdin, an interactive interpreter) comes back unchanged."""
    if not PYTHON_NAME.match(os.path.basename(cmd[0])):
        return cmd
    i = 1
    while i < len(cmd) and cmd[i].startswith("-") and cmd[i] not in ("-", "-m"):
        if cmd[i].startswith("-c"):
            return cmd
        i += 2 if cmd[i] in OPTIONS_WITH_VALUE else 1
    if i >= len(cmd) or cmd[i] == "-":
        return cmd
    return cmd[:i] + ["-m", "offload"] + cmd[i:]


def run(cmd: list[str]) -> None:
    from moreh_cli import common

    if not common.load_settings().user_token():
        raise common.ToolError("no token: set MOAI_TOKEN or write your token to the token file "
                               "(`python -m daemons.embedded up` makes one for the embedded cluster)")
    env = {**os.environ, autostart.ENABLE_ENV: "1"}
    argv = through_offload(cmd)
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise common.ToolError(f"cannot run {cmd[0]}: {e.strerror}") from None


def status() -> None:
    from moreh_cli import common

    torch_version = hook.installed_torch_version() or "not installed"
    print(f"MoAI Platform {common.client_version()} (torch {torch_version})")
    print("\n".join(hook.status_lines(hook.default_site_dir())))
    settings = common.load_settings()
    token = settings.user_token()
    if not token:
        print(f"master: {settings.master_addr} (no token)")
        return
    master = common.MasterConnection(settings, token)
    try:
        version = master.call("hello")["server_version"]
        devices = master.call("list_devices")["devices"]
    finally:
        master.close()
    print(f"master: {settings.master_addr} (server version {version})")
    current = next((d for d in devices if d["current"]), None)
    print("current device: " + (f"{current['id']} ({current['flavor']})" if current else
                                "none; add one with `moreh-smi device --add`"))


def main(argv=None) -> int:
    from moreh_cli import common

    parser = argparse.ArgumentParser(prog="moai", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a command with cuda:0 on the virtual device")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    sub.add_parser("status", help="hook, settings, master and current device")
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run: give the command to run, e.g. `moai run python train.py`")
        return common.run_tool("moai", lambda: run(cmd))
    return common.run_tool("moai", status)


if __name__ == "__main__":
    sys.exit(main())
