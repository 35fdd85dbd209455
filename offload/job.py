"""The front's job at the master: allocation (waiting in the queue if need be), heartbeats, release.

The front asks for the GPUs of its current device once it first touches the device
(``allocate_job``; the master answers when the workers run, or at once with ``queued``), learns
its workers from ``job_status``, and from then on heartbeats every ``heartbeat_interval_s`` with
its memory figures. A heartbeat answer is also how it learns that the master failed the job (a
worker exited, a node was lost): ``failure`` then says why.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable

from daemons import config, wire

# allocate_job is answered once the agents started the workers: allow for their start-up.
ALLOCATE_MARGIN_S = 30.0
RELEASE_TIMEOUT_S = 5.0
ENDED_STATES = ("failed", "finished")


class JobError(RuntimeError):
    """The master could not give this process a device (none configured, too large, failed)."""


def process_name() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])[:200] or "python"


class Job:
    def __init__(self, settings: config.Settings):
        token = settings.user_token()
        if not token:
            raise JobError("no MoAI token is configured: set MOAI_TOKEN, `token` in the config file, "
                           f"or write it to {settings.path('token_file')}")
        self.settings = settings
        self.token = token
        self.failure: str | None = None           # set when the master ended the job under us
        self.memory: Callable[[], tuple[int, int]] = lambda: (0, 0)   # (used, peak) bytes to report
        self._master = wire.Client(settings.master_addr, token, timeout_s=settings.agent_call_timeout_s)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.id: int | None = None
        self._call("hello", {})  # an unreachable master fails in seconds, not after a launch's wait
        try:
            reply = self._call("allocate_job", {"pid": os.getpid(), "process_name": process_name(),
                                                "hostname": socket.gethostname()},
                               settings.worker_start_timeout_s + settings.agent_call_timeout_s
                               + ALLOCATE_MARGIN_S)
            self.id = int(reply["job_id"])
            status = self._wait_running(reply)
        except BaseException:  # Ctrl-C while queued included: give the place in the queue back
            self.release()
            raise
        workers = sorted(status["workers"], key=lambda w: w["rank"])
        self.addresses = [w["address"] for w in workers]
        self.secret = status["job_secret"]
        # At once: the master expects heartbeats from now on, while we still connect to the workers.
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name=f"moai-heartbeat-{self.id}")
        self._heartbeat.start()

    def _call(self, msg_type: str, body: dict, timeout_s: float | None = None) -> dict:
        try:
            return self._master.call(msg_type, body, timeout_s)
        except wire.TransportTimeout:
            raise JobError(f"the MoAI master at {self.settings.master_addr} did not answer "
                           f"{msg_type!r}: is the cluster up (`make up`)?") from None
        except wire.RemoteError as e:
            raise JobError(f"the MoAI master refused {msg_type!r}: {e.message}") from None

    def _wait_running(self, reply: dict) -> dict:
        told = False
        poll_s = min(0.5, self.settings.heartbeat_interval_s)
        while True:
            if reply["state"] == "queued" and not told:
                print(f"moai: job {self.id} is queued: {reply['message']}", file=sys.stderr, flush=True)
                told = True
            if reply["state"] in ENDED_STATES:
                raise JobError(f"job {self.id} {reply['state']}: {reply['message']}")
            if reply["state"] == "running" and "workers" in reply:
                return reply
            if reply["state"] != "running":
                time.sleep(poll_s)  # polling keeps a queued job alive at the master
            reply = self._call("job_status", {"job_id": self.id})

    # --- while running ----------------------------------------------------------------------
    def _beat(self):
        interval = self.settings.heartbeat_interval_s
        client = wire.Client(self.settings.master_addr, self.token, timeout_s=max(2.0, 2 * interval))
        try:
            while not self._stop.wait(interval):
                try:
                    used, peak = self.memory()
                except Exception:  # figures are best effort; the heartbeat itself is not
                    used, peak = 0, 0
                try:
                    reply = client.call("heartbeat_job", {"job_id": self.id, "memory_used": used,
                                                          "memory_peak": peak})
                except wire.TransportTimeout:
                    continue  # the master may be restarting: it keeps our job meanwhile
                except wire.RemoteError as e:
                    reply = {"state": "failed", "message": e.message}
                if reply["state"] in ENDED_STATES:
                    self.failure = f"the master ended job {self.id}: {reply.get('message') or reply['state']}"
                    return
        finally:
            client.close()

    def failure_reason(self, wait_s: float) -> str | None:
        """Why the job ended, waiting up to ``wait_s`` for the master to learn it (None: it runs)."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            try:
                status = self._master.call("job_status", {"job_id": self.id}, timeout_s=1.0)
            except wire.RemoteError as e:  # refused: our token was revoked, which ended the job
                status = {"state": "failed", "message": e.message}
            except wire.WireError:
                break
            if status["state"] in ENDED_STATES:
                self.failure = f"the master ended job {self.id}: {status['message']}"
            else:
                time.sleep(0.2)
        return self.failure

    def _device_id(self) -> int | None:
        processes = self._call("list_processes", {})["processes"]
        mine = [p["device_id"] for p in processes if p["job_id"] == self.id]
        return mine[0] if mine else None

    def device_name(self) -> str:
        """The size of the device the job runs on, as the menus name it (``Small.64GB``)."""
        device_id = self._device_id()
        flavors = {d["id"]: d["flavor"] for d in self._call("list_devices", {})["devices"]}
        return flavors.get(device_id, "")

    def gpu_telemetry(self) -> list[dict]:
        """The latest telemetry of the device's GPUs, as moreh-smi shows it (``list_physical_gpus``:
        ``util``, ``mem_util``, ``temp_c`` ..., None where a GPU has no such sensor)."""
        device_id = self._device_id()
        if device_id is None:
            return []
        return self._call("list_physical_gpus", {"device_id": device_id})["gpus"]

    def release(self):
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=RELEASE_TIMEOUT_S)
        if self.id is not None:
            try:
                self._master.call("release_job", {"job_id": self.id}, timeout_s=RELEASE_TIMEOUT_S)
            except wire.WireError:
                pass  # the master fails the job itself once our heartbeats stop
            self.id = None
        self._master.close()
