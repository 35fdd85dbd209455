"""Worker processes as supervisor programs, driven over supervisor's XML-RPC interface.

Worker ``i`` is the program ``<group>:worker-<ii>`` of the node's supervisord (see
daemons/supervisord/*.conf). Start and stop are idempotent: "already started" and "not running"
count as success, so a retried request is harmless. ``supervisor_url`` may be ``http://`` or
``unix://`` (supervisor's own transport speaks both).
"""
from __future__ import annotations

import threading
import xmlrpc.client
from dataclasses import dataclass

from supervisor.xmlrpc import Faults, SupervisorTransport

# Supervisor process states in which the process is gone and will not come back by itself
# (workers run with autorestart=false).
EXITED_STATES = frozenset({"EXITED", "FATAL"})


class SupervisorUnavailable(Exception):
    """supervisord did not answer; the agent keeps running and retries on the next request."""


@dataclass(frozen=True)
class ProgramState:
    gpu: int
    state: str           # supervisor statename: STOPPED, STARTING, RUNNING, EXITED, FATAL, ...
    pid: int             # 0 when not running
    exit_status: int

    @property
    def alive(self) -> bool:
        return self.state in ("STARTING", "RUNNING", "STOPPING")


class WorkerPrograms:
    """Start/stop/inspect the worker programs of one supervisord group; thread safe."""

    def __init__(self, supervisor_url: str, group: str = "workers"):
        self.url = supervisor_url
        self.group = group
        # ServerProxy is not thread safe; the server thread and the heartbeat thread share this.
        self._lock = threading.Lock()
        self._proxy = xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, supervisor_url))

    def name(self, gpu: int) -> str:
        return f"{self.group}:worker-{gpu:02d}"

    def _call(self, method: str, *args):
        with self._lock:
            try:
                return getattr(self._proxy.supervisor, method)(*args)
            except xmlrpc.client.Fault:
                raise
            except (OSError, xmlrpc.client.ProtocolError) as e:
                raise SupervisorUnavailable(f"supervisord at {self.url} did not answer: {e}") from None

    def start(self, gpu: int):
        try:
            # wait=False: the worker imports torch for seconds; the front's connect waits instead.
            self._call("startProcess", self.name(gpu), False)
        except xmlrpc.client.Fault as e:
            if e.faultCode != Faults.ALREADY_STARTED:
                raise

    def stop(self, gpu: int):
        try:
            self._call("stopProcess", self.name(gpu), True)
        except xmlrpc.client.Fault as e:
            if e.faultCode != Faults.NOT_RUNNING:
                raise

    def states(self) -> dict[int, ProgramState]:
        """gpu -> state of every worker program of the group."""
        out = {}
        for info in self._call("getAllProcessInfo"):
            if info["group"] != self.group or not info["name"].startswith("worker-"):
                continue
            gpu = int(info["name"].removeprefix("worker-"))
            out[gpu] = ProgramState(gpu, info["statename"], info["pid"], info["exitstatus"])
        return out
