"""A real cluster for tests, in the spirit of dask's ``gen_cluster``.

``start_cluster(tmp_path, nodes=1)`` starts the embedded stack exactly as users run it (supervisord
on daemons/supervisord/embedded.conf: master + agent + on-demand workers) in a temporary state
directory, on free loopback ports written into a temporary ``moai.toml``. Each extra node is one
more supervisord on backnode.conf (agent + workers), as on a real back node. It waits until the
master answers and every node is registered, yields a :class:`Cluster`, and on exit shuts every
supervisord down and fails if any process carrying this cluster's ``MOAI_CONFIG`` is still alive.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from daemons import config, embedded, loopback_ports, wire
from daemons.loopback_ports import free_port
from daemons.master.jobs import RENDEZVOUS_PORT_OFFSET

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0          # cold torch imports on a loaded 2-core CI machine are slow
SHUTDOWN_TIMEOUT_S = 30.0
# Fast timings so that death detection tests take seconds, not minutes.
TEST_TIMINGS = {"heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 3.0,
                "agent_call_timeout_s": 5.0, "worker_start_timeout_s": 60.0}


def free_port_block(slots: int) -> int:
    """A worker_port_base whose worker ports (base+i) and rendezvous ports (base+100+i) are free."""
    return loopback_ports.free_port_block(slots, offsets=(0, RENDEZVOUS_PORT_OFFSET))


def toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value).lower() if isinstance(value, bool) else repr(value)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Node:
    """One supervisord (the first also runs the master) with its own state dir and settings."""
    name: str
    settings: config.Settings
    config_path: Path
    env: dict
    layout: str                      # "embedded" or "backnode"
    proc: subprocess.Popen | None = None

    @property
    def supervisor(self):
        return embedded.supervisor_proxy(self.settings)

    def program(self, name: str) -> dict:
        return self.supervisor.supervisor.getProcessInfo(name)

    def pid(self, name: str) -> int:
        return self.program(name)["pid"]

    def log(self, name: str) -> str:
        path = self.settings.path("state_dir") / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        conf = self.settings.path("state_dir") / "supervisord" / f"{self.layout}.conf"
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args],
                              env=self.env, capture_output=True, text=True, timeout=30)

    def agent(self, timeout_s: float = 10.0) -> wire.Client:
        return wire.Client(self.settings.agent_addr, self.settings.cluster_secret, timeout_s=timeout_s)


@dataclass
class Cluster:
    nodes: list[Node]
    token: str = ""
    _clients: list = field(default_factory=list)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def settings(self) -> config.Settings:
        return self.head.settings

    @property
    def env(self) -> dict:
        """Environment for user-side subprocesses (fronts, CLI tools): settings and token."""
        return {**self.head.env, "MOAI_TOKEN": self.token}

    @property
    def supervisor(self):
        return self.head.supervisor

    @property
    def admin(self) -> wire.Client:
        return self.client(self.settings.cluster_secret)

    def client(self, token: str | None = None, timeout_s: float = 10.0) -> wire.Client:
        c = wire.Client(self.settings.master_addr, self.token if token is None else token, timeout_s=timeout_s)
        self._clients.append(c)
        return c

    def nodes_alive(self) -> dict[str, bool]:
        return {n["node"]: n["alive"] for n in self.admin.call("list_nodes")["nodes"]}

    def run(self, *cmd: str, timeout_s: float = 120.0, **kw) -> subprocess.CompletedProcess:
        """A user-side command (``python train.py``, ``moreh-smi``) against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s, **kw)

    def close_clients(self):
        for c in self._clients:
            c.close()
        self._clients.clear()


def _node(root: Path, name: str, shared: dict, slots: int, layout: str) -> Node:
    state = root / name
    state.mkdir(parents=True)
    agent = f"tcp://127.0.0.1:{free_port()}"
    values = {**shared, "state_dir": str(state), "token_file": str(state / "token"), "node_name": name,
              "agent_bind": agent, "agent_addr": agent, "virtual_gpus": slots,
              "worker_port_base": free_port_block(slots),
              "supervisor_url": f"http://127.0.0.1:{free_port()}/RPC2"}
    path = state / "moai.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
    env.update(MOAI_CONFIG=str(path), HOME=str(root / "home"), PYTHONPATH=str(REPO_ROOT))
    return Node(name, config.load(path, env), path, env, layout)


def processes_with(config_path: Path) -> list[int]:
    """Pids of live processes whose environment names this cluster's config (leak detection)."""
    return embedded.processes_with_env(f"MOAI_CONFIG={config_path}")


def _shutdown(node: Node) -> list[int]:
    """Stop a node's supervisord (and everything under it); returns pids that outlived it."""
    if node.proc is None:
        return []
    if node.proc.poll() is None:
        try:
            node.supervisor.supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(timeout=10)
    leaked = processes_with(node.config_path)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leaked


def cluster_nodes(root: Path, *, nodes: int = 1, gpus_per_node: int = 2, **overrides) -> list[Node]:
    """The settings of a cluster in ``root`` on free loopback ports, nothing started yet: the first
    node is an embedded stack (master included), the others back nodes."""
    root = Path(root)
    (root / "home").mkdir(parents=True, exist_ok=True)
    master = f"tcp://127.0.0.1:{free_port()}"
    shared = {"master_addr": master, "master_bind": master, "db_path": str(root / "master.db"),
              "cluster_secret": secrets.token_hex(8), **TEST_TIMINGS, **overrides}
    return [_node(root, f"node{i}", shared, gpus_per_node, "embedded" if i == 0 else "backnode")
            for i in range(nodes)]


@contextlib.contextmanager
def start_cluster(root: Path, *, nodes: int = 1, gpus_per_node: int = 2, **overrides):
    """Yield a running :class:`Cluster` of ``nodes`` nodes; ``overrides`` are extra settings."""
    members = cluster_nodes(root, nodes=nodes, gpus_per_node=gpus_per_node, **overrides)
    cluster = Cluster(members)
    leaked: list[int] = []
    try:
        for node in members:
            node.proc = embedded.start(node.settings, foreground=True, env=node.env, layout=node.layout)
        embedded.wait_ready(cluster.settings, READY_TIMEOUT_S, nodes=tuple(n.name for n in members))
        cluster.token = embedded.ensure_token(cluster.settings)
        yield cluster
    finally:
        cluster.close_clients()
        for node in reversed(members):
            leaked += _shutdown(node)
    assert not leaked, f"processes outlived the cluster: {leaked}"
