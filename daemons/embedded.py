"""The embedded single-machine cluster: master + agent + workers under one supervisord.

    python -m daemons.embedded up       render the config into the state dir, start, wait, make a token
    python -m daemons.embedded down     stop supervisord and every daemon and worker under it
    python -m daemons.embedded status   `supervisorctl status`

Settings come from the usual place (``$MOAI_CONFIG``, ``~/.moai/moai.toml``, ``MOAI_*``); the
daemons started here inherit the same environment, so they read the same settings.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from urllib.parse import urlparse

from supervisor.xmlrpc import SupervisorTransport

from daemons import config

CONF_DIR = Path(__file__).parent / "supervisord"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.2
_ENV_REFERENCE = re.compile(r"%\(ENV_(MOAI_[A-Z_]+)\)s")


class StackError(Exception):
    """The stack did not come up (or down); the message says which daemon and where its log is."""


def supervisor_port(settings: config.Settings) -> int:
    url = urlparse(settings.supervisor_url)
    if url.scheme != "http" or url.port is None:
        raise StackError(f"supervisor_url must be http://127.0.0.1:<port>/RPC2 for the embedded stack, "
                         f"not {settings.supervisor_url!r}")
    return url.port


def worker_slots(settings: config.Settings) -> int:
    from daemons.agent.inventory import Inventory
    return max(1, len(Inventory(settings.virtual_gpus, settings.virtual_gpu_memory_mb).gpus))


def template_values(settings: config.Settings) -> dict[str, str]:
    """The values of the ``%(ENV_MOAI_*)s`` references in daemons/supervisord/*.conf."""
    return {"MOAI_STATE_DIR": str(settings.path("state_dir")),
            "MOAI_SUPERVISOR_PORT": str(supervisor_port(settings)),
            "MOAI_WORKER_SLOTS": str(worker_slots(settings)),
            "MOAI_PYTHON": sys.executable}


def render(settings: config.Settings, layout: str = "embedded") -> Path:
    """Write the supervisord config files, values filled in, under ``<state_dir>/supervisord``.
    Filled in rather than left to the environment so a bare ``supervisorctl -c`` works too."""
    values = template_values(settings)
    state_dir = settings.path("state_dir")
    out = state_dir / "supervisord"
    for d in (out, state_dir / "logs", state_dir / "workers"):
        d.mkdir(parents=True, exist_ok=True)

    def fill(m: re.Match) -> str:
        return values[m.group(1)] if m.group(1) in values else m.group(0)

    for src in CONF_DIR.glob("*.conf"):
        (out / src.name).write_text(_ENV_REFERENCE.sub(fill, src.read_text()))
    return out / f"{layout}.conf"


def supervisor_proxy(settings: config.Settings):
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, settings.supervisor_url))


def supervisor_running(settings: config.Settings) -> bool:
    try:
        return supervisor_proxy(settings).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Error):
        return False


def start(settings: config.Settings, *, foreground: bool = False,
          env: dict | None = None, layout: str = "embedded") -> subprocess.Popen:
    """Start supervisord on the rendered config. ``foreground`` keeps it a child of this process
    (tests); otherwise it daemonizes and the returned process is only its short-lived launcher."""
    conf = render(settings, layout)
    cmd = [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)] + (["-n"] if foreground else [])
    # In the state dir, not where `up` was typed: every daemon and worker inherits this directory,
    # and a checkout removed under a running stack left its workers unable to load torch.
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, cwd=settings.path("state_dir"))
    if not foreground and proc.wait(timeout=READY_TIMEOUT_S) != 0:
        raise StackError(f"supervisord failed to start; see {settings.path('state_dir') / 'logs' / 'supervisord.log'}")
    return proc


def _daemons_running(settings: config.Settings) -> bool:
    """Whether supervisord reports every daemon (not the on-demand workers) RUNNING; raises
    StackError for one that cannot start."""
    states = []
    for info in supervisor_proxy(settings).supervisor.getAllProcessInfo():
        if info["group"] == settings.supervisor_worker_group:
            continue
        if info["statename"] in ("FATAL", "BACKOFF"):
            log = settings.path("state_dir") / "logs" / f"{info['name']}.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise StackError(f"{info['name']} cannot start ({info['statename']}); {log}:\n{tail}")
        states.append(info["statename"])
    return all(state == "RUNNING" for state in states)


def wait_ready(settings: config.Settings, timeout_s: float = READY_TIMEOUT_S, nodes: tuple = ()):
    """Until the master answers and the agent(s) of ``nodes`` (default: this node) are registered
    and alive. Raises StackError naming what is missing."""
    from daemons import wire  # see main()

    nodes = set(nodes or (settings.node_name,))
    admin = wire.Client(settings.master_addr, settings.cluster_secret, timeout_s=2.0)
    deadline = time.monotonic() + timeout_s
    missing = "the master"
    try:
        while time.monotonic() < deadline:
            # supervisord marks a daemon RUNNING only after its startsecs: until then `status`
            # would still say STARTING.
            if supervisor_running(settings) and not _daemons_running(settings):
                missing = "supervisord's RUNNING state for the daemons"
                time.sleep(POLL_INTERVAL_S)
                continue
            try:
                alive = {n["node"] for n in admin.call("list_nodes")["nodes"] if n["alive"]}
                missing = ", ".join(sorted(nodes - alive)) or ""
                if not missing:
                    return
                missing = f"node(s) {missing}"
            except wire.WireError:
                admin.close()
                admin = wire.Client(settings.master_addr, settings.cluster_secret, timeout_s=2.0)
            time.sleep(POLL_INTERVAL_S)
    finally:
        admin.close()
    raise StackError(f"{missing} not ready after {timeout_s:.0f}s; see the logs in "
                     f"{settings.path('state_dir') / 'logs'}")


def ensure_token(settings: config.Settings) -> str:
    """The user's token; on the first start one is created by the master and saved (mode 0600)."""
    from daemons import wire  # see main()

    token = settings.user_token()
    if token:
        return token
    admin = wire.Client(settings.master_addr, settings.cluster_secret)
    try:
        token = admin.call("create_token", {"user": getpass.getuser()})["token"]
    finally:
        admin.close()
    path = settings.path("token_file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def stop(settings: config.Settings, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Shut the stack down: supervisord stops every program first, then whatever outlived it (the
    orphans of a supervisord that crashed or was killed) is terminated. False when nothing of the
    stack was running."""
    pid = _supervisord_pid(settings)
    try:
        supervisor_proxy(settings).supervisor.shutdown()
        stopped = True
    except (OSError, xmlrpc.client.Error):
        stopped = False
    else:
        _wait_gone([pid] if pid else [], timeout_s)
    leftovers = stack_pids(settings)
    if leftovers:
        terminate(leftovers, timeout_s)
    return stopped or bool(leftovers)


def stack_pids(settings: config.Settings) -> list[int]:
    """Live processes of this stack: its supervisord and every process started under it.
    supervisord writes its own XML-RPC address into each child's environment, which finds the
    children even after supervisord itself is gone."""
    found = processes_with_env(f"SUPERVISOR_SERVER_URL=http://{urlparse(settings.supervisor_url).netloc}")
    pid = _supervisord_pid(settings)
    return found + [pid] if pid and pid not in found else found


def processes_with_env(entry: str) -> list[int]:
    """Live processes other than this one whose environment holds ``entry`` (``NAME=value``)."""
    marker = entry.encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "environ").read_bytes().split(b"\0") and _pid_alive(int(d.name)):
                found.append(int(d.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _supervisord_pid(settings: config.Settings) -> int | None:
    """supervisord's pid from its pidfile, if that process still runs supervisord (a stale pidfile
    of a killed supervisord may name an unrelated process by now)."""
    pidfile = settings.path("state_dir") / "supervisord.pid"
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"supervisord" in cmdline and _pid_alive(pid) else None


def terminate(pids: list[int], timeout_s: float):
    """SIGTERM, then SIGKILL whatever is still alive after ``timeout_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pids, timeout_s, raise_on_timeout=False):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids, timeout_s)


def _wait_gone(pids: list[int], timeout_s: float, raise_on_timeout: bool = True) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            if raise_on_timeout:
                raise StackError(f"processes {[p for p in pids if _pid_alive(p)]} still running "
                                 f"after {timeout_s:.0f}s")
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) is gone for every purpose but the process table.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_up(settings: config.Settings) -> int:
    if supervisor_running(settings):
        print(f"the embedded stack is already running ({settings.supervisor_url})")
    else:
        # Orphans of a crashed stack would hold the master's port and GPUs' worker ports.
        if stop(settings):
            print("stopped the leftover processes of an embedded stack that had crashed")
        start(settings)
    wait_ready(settings)
    ensure_token(settings)
    print(f"embedded cluster up: master {settings.master_addr}, node {settings.node_name}, "
          f"state in {settings.path('state_dir')}")
    print(f"your token is in {settings.path('token_file')}; try:  moreh-smi   then   python train.py")
    print("stop it with:  python -m daemons.embedded down")
    return 0


def cmd_down(settings: config.Settings) -> int:
    print("embedded cluster stopped" if stop(settings) else "the embedded stack was not running")
    return 0


def cmd_status(settings: config.Settings) -> int:
    conf = settings.path("state_dir") / "supervisord" / "embedded.conf"
    if not conf.exists():
        print(f"the embedded stack was never started here ({conf} is missing)")
        return 3
    if not supervisor_running(settings):
        leftovers = stack_pids(settings)
        print("the embedded stack is not running" + (
            f"; {len(leftovers)} of its processes outlived a crash (pids {leftovers}): "
            "`python -m daemons.embedded down` stops them" if leftovers else ""))
        return 3
    rc = subprocess.call([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"])
    # supervisorctl answers 3 when some program is not running: idle workers always are.
    return 0 if rc == 3 else rc


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemons.embedded", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](config.load())
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
