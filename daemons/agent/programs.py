"""Worker processes as supervisor programs, driven over supervisor's XML-RPC interface.

Worker ``i`` is the program ``<group>:worker-<ii>`` of the node's supervisord (see
daemons/supervisord/*.conf). Start and stop are idempotent: "already started" and "not running"
count as success, so a retried request is harmless. ``supervisor_url`` may be ``http://`` or
``unix://`` (supervisor's own transport speaks both).
"""
from __future__ import annotations

import threading
import time
import xmlrpc.client
from dataclasses import dataclass

from supervisor.xmlrpc import Faults, SupervisorTransport

# Supervisor process states in which the process is gone and will not come back by itself
# (workers run with autorestart=false).
EXITED_STATES = frozenset({"EXITED", "FATAL"})
GONE_STATES = EXITED_STATES | {"STOPPED"}
# supervisord kills a worker that ignores SIGTERM after its stopwaitsecs (5 s): far less than this.
PREDECESSOR_STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1


class SupervisorUnavailable(Exception):
    """supervisord did not answer; the agent keeps running and retries on the next request."""


class ProgramStuck(Exception):
    """A GPU's previous worker would not go away, so a new one cannot start there."""


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
            except xmlrpc.client.Fault as e:
                if e.faultCode == Faults.SHUTDOWN_STATE:  # the node is going down, the agent with it
                    raise SupervisorUnavailable(f"supervisord at {self.url} is shutting down") from None
                raise
            except (OSError, xmlrpc.client.ProtocolError) as e:
                raise SupervisorUnavailable(f"supervisord at {self.url} did not answer: {e}") from None

    def start(self, gpu: int):
        """Start a fresh worker for ``gpu``. A previous worker still there (its stop in flight, or a
        stop that was lost) is stopped and waited for first: supervisord silently ignores a start
        of a process that has not exited yet, and the new job would be served by the old worker."""
        name = self.name(gpu)
        deadline = time.monotonic() + PREDECESSOR_STOP_TIMEOUT_S
        while (state := self._call("getProcessInfo", name)["statename"]) not in GONE_STATES:
            if time.monotonic() > deadline:
                raise ProgramStuck(f"{name} is still {state} after {PREDECESSOR_STOP_TIMEOUT_S:g} s")
            if state != "STOPPING":
                self.stop(gpu)
            time.sleep(POLL_INTERVAL_S)
        try:
            # wait=False: the worker imports torch for seconds; the front's connect waits instead.
            self._call("startProcess", name, False)
        except xmlrpc.client.Fault as e:
            if e.faultCode != Faults.ALREADY_STARTED:
                raise

    def stop(self, gpu: int):
        """Send the worker SIGTERM and return: a worker may take seconds to exit (supervisord
        escalates to SIGKILL), and the agent must not stop serving and heartbeating meanwhile."""
        try:
            self._call("stopProcess", self.name(gpu), False)
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
