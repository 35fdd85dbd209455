"""Helpers for the master's tests: a real ``moai-master`` subprocess on a free loopback port with
a temporary database, fake back nodes that speak the agent protocol, and the CLI tools run as
subprocesses with ``MOAI_*`` settings.

A fake node is a real client of the master (register_node / heartbeat_node from a thread) plus a
tiny agent ROUTER (``wire.Server``) that answers launch_worker / stop_worker and records them; no
worker processes are started, because these tests are about the master's books.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemons import wire
from daemons.loopback_ports import free_port
from tests.cluster import toml_value, wait_until

CLUSTER_SECRET = "test-cluster-secret"
HEARTBEAT_TIMEOUT_S = 2.0
NODE_HEARTBEAT_INTERVAL_S = 0.2
MASTER_START_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parents[2]


class MasterProcess:
    """``moai-master`` as a subprocess; ``kill()`` + ``start()`` keeps the port and database."""

    def __init__(self, tmp_path: Path, **settings):
        self.tmp_path = tmp_path
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.config = tmp_path / "moai.toml"
        values = {"master_addr": self.address, "master_bind": self.address, "db_path": str(tmp_path / "master.db"),
                  "state_dir": str(tmp_path), "token_file": str(tmp_path / "token"),
                  "cluster_secret": CLUSTER_SECRET, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                  "agent_call_timeout_s": 2.0, "worker_start_timeout_s": 2.0, **settings}
        self.config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / "master.log"

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
        env.update({"MOAI_CONFIG": str(self.config), "PYTHONPATH": str(REPO_ROOT)})
        env.update(extra)
        return env

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemons.master.main"], env=self.env(),
                                         stdout=log, stderr=log)
        probe = wire.Client(self.address, timeout_s=0.5)
        try:
            def answers():
                if self.proc.poll() is not None:
                    raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log.read_text()}")
                try:
                    return probe.call("hello")
                except wire.TransportTimeout:
                    return None
            wait_until(answers, MASTER_START_TIMEOUT_S, "the master to answer hello")
        finally:
            probe.close()

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def client(self, token: str | None, timeout_s: float = 10.0) -> wire.Client:
        return wire.Client(self.address, token, timeout_s=timeout_s)

    def admin(self) -> wire.Client:
        return self.client(CLUSTER_SECRET)

    def create_token(self, user: str) -> str:
        admin = self.admin()
        try:
            return admin.call("create_token", {"user": user})["token"]
        finally:
            admin.close()

    def run_cli(self, module: str, *args, token: str | None = None, stdin: str | None = None,
                env: dict | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        env = self.env(**({"MOAI_TOKEN": token} if token else {}), **(env or {}))
        return subprocess.run([sys.executable, "-m", f"moreh_cli.{module}", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=timeout_s)


class Repeating:
    """Sends one request every NODE_HEARTBEAT_INTERVAL_S from a thread, on a client of its own,
    until stopped; while the test restarts the master, beats are only missed."""

    def __init__(self, client_of, send):
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._run, args=(client_of, send), daemon=True)
        self._thread.start()

    def _run(self, client_of, send):
        client = client_of()
        try:
            while self._running.is_set():
                try:
                    send(client)
                except wire.WireError:
                    pass
                time.sleep(NODE_HEARTBEAT_INTERVAL_S)
        finally:
            client.close()

    def stop(self):
        self._running.clear()
        self._thread.join(timeout=5)


class FakeNode:
    """A back node as the master sees it: registration, heartbeats, an agent that 'launches'."""

    def __init__(self, master: MasterProcess, name: str, gpus: int, fail_launch: bool = False,
                 launch_hangs: bool = False):
        """``launch_hangs``: launch_worker never answers (a worker slow to start), until close."""
        self.master = master
        self.name = name
        self.gpus = gpus
        self.fail_launch = fail_launch
        self.launch_hangs = launch_hangs
        self._closing = threading.Event()
        self.asked_to_launch: list[dict] = []
        self.launched: list[dict] = []
        self.stopped: list[dict] = []
        self.workers: list[dict] = []          # what its heartbeats say runs on it
        self.faults: dict[int, tuple[str, bool]] = {}   # gpu -> (fault, lost) its heartbeats report
        self.agent = wire.Server("tcp://127.0.0.1:0", {"launch_worker": self._launch, "stop_worker": self._stop},
                                 name=f"agent-{name}")
        self._agent_thread = threading.Thread(target=self.agent.serve_forever, daemon=True)
        self._agent_thread.start()
        self._heartbeats: Repeating | None = None

    def _launch(self, msg):
        self.asked_to_launch.append(msg.body)
        if self.launch_hangs:
            self._closing.wait()
        if msg.token != CLUSTER_SECRET:
            raise wire.RequestError("unauthorized", "bad cluster secret")
        if self.fail_launch:
            raise wire.RequestError("launch_failed", "supervisor refused to start the worker")
        self.launched.append(msg.body)
        return {"address": f"tcp://127.0.0.1:{5700 + msg.body['gpu']}"}

    def _stop(self, msg):
        self.stopped.append(msg.body)
        return {}

    def telemetry(self) -> list[dict]:
        return [{"index": i, "util": 50 + i, "mem_util": 10 + i, "mem_used": 1024 * (i + 1), "mem_total": 4096,
                 "temp_c": 40 + i, "mem_temp_c": 45 + i, "fault": self.faults.get(i, (None, False))[0],
                 "lost": self.faults.get(i, (None, False))[1]} for i in range(self.gpus)]

    def register(self):
        cluster = self.master.admin()
        try:
            cluster.call("register_node", {
                "node": self.name, "agent_addr": self.agent.address, "worker_host": "127.0.0.1",
                "gpus": [{"index": i, "name": "virtual", "memory": 2 << 30} for i in range(self.gpus)]})
        finally:
            cluster.close()
        self.start_heartbeats()

    def start_heartbeats(self):
        self._heartbeats = Repeating(self.master.admin, lambda c: c.call(
            "heartbeat_node", {"node": self.name, "gpus": self.telemetry(), "workers": self.workers}, timeout_s=1.0))

    def stop_heartbeats(self):
        if self._heartbeats is not None:
            self._heartbeats.stop()
            self._heartbeats = None

    def close(self):
        self._closing.set()
        self.stop_heartbeats()
        self.agent.stop()
        self._agent_thread.join(timeout=5)


@pytest.fixture
def master(tmp_path):
    proc = MasterProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def make_node(master):
    nodes = []

    def make(name: str, gpus: int, **kwargs) -> FakeNode:
        node = FakeNode(master, name, gpus, **kwargs)
        nodes.append(node)
        node.register()
        return node

    yield make
    for node in nodes:
        node.close()


class FrontHeartbeat(Repeating):
    """Keeps a job's front 'alive' (heartbeat_job from a thread) until stopped, reporting
    ``memory_used`` as it is at each beat."""

    def __init__(self, master: MasterProcess, token: str, job_id: int, memory_used: int = 0):
        self.memory_used = memory_used
        super().__init__(lambda: master.client(token, timeout_s=1.0), lambda c: c.call(
            "heartbeat_job", {"job_id": job_id, "memory_used": self.memory_used, "memory_peak": self.memory_used}))


class FrontHeartbeats:
    """Heartbeats for the fronts of several jobs, all stopped when the ``with`` block ends."""

    def __init__(self, master: MasterProcess, *jobs: tuple[str, int]):
        self.master = master
        self.beats = [FrontHeartbeat(master, token, job_id) for token, job_id in jobs]

    def add(self, token: str, job_id: int):
        self.beats.append(FrontHeartbeat(self.master, token, job_id))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for beat in self.beats:
            beat.stop()
