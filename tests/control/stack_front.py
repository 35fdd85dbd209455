"""A front process as the control plane sees it, for tests against the real stack: it allocates a
job for its token's current device, heartbeats it from a thread like the offload layer does, says
hello to the job's workers and releases the job; ``die()`` is a front that vanished.

``fronts`` is the fixture: a factory whose fronts are stopped before the cluster goes down.
"""
from __future__ import annotations

import os

import pytest

from daemons import wire
from master_fixture import FrontHeartbeat
from tests.cluster import Cluster, wait_until

# allocate_job is answered once the agents started the workers (they answer before torch loads).
ALLOCATE_TIMEOUT_S = 30.0
# A worker answers hello after importing torch: seconds, more on a loaded 2-core machine.
WORKER_READY_TIMEOUT_S = 90.0


class Front:
    def __init__(self, cluster: Cluster, token: str, pid: int, process: str = "python train.py"):
        self.cluster = cluster
        self.token = token
        self.pid = pid
        self.process = process
        self.master = cluster.client(token)
        self.job_id: int | None = None
        self.beat: FrontHeartbeat | None = None
        self._workers: list[wire.Client] = []

    def allocate(self) -> dict:
        reply = self.master.call("allocate_job", {"pid": self.pid, "process_name": self.process,
                                                  "hostname": "front"}, timeout_s=ALLOCATE_TIMEOUT_S)
        self.job_id = reply["job_id"]
        self.beat = FrontHeartbeat(self.cluster, self.token, self.job_id)
        return reply

    def status(self) -> dict:
        return self.master.call("job_status", {"job_id": self.job_id})

    def wait_state(self, state: str, timeout_s: float) -> dict:
        """Polls as a front does: ``heartbeat_job`` is how a running front learns its job failed."""
        def reached():
            reply = self.master.call("heartbeat_job", {"job_id": self.job_id})
            return reply if reply["state"] == state else None
        return wait_until(reached, timeout_s, f"job {self.job_id} to be {state}")

    def workers(self) -> list[wire.Client]:
        if not self._workers:
            status = self.status()
            self._workers = [wire.Client(w["address"], status["job_secret"], timeout_s=WORKER_READY_TIMEOUT_S)
                             for w in status["workers"]]
        return self._workers

    def hello(self) -> list[dict]:
        """Every worker's hello, waiting for workers still starting."""
        return [w.call("hello") for w in self.workers()]

    def die(self):
        """The front process vanished: no more heartbeats, no release."""
        if self.beat:
            self.beat.stop()
            self.beat = None

    def release(self, exit_code: int = 0) -> dict:
        self.die()
        return self.master.call("release_job", {"job_id": self.job_id, "exit_code": exit_code})

    def close(self):
        self.die()
        for w in self._workers:
            w.close()


def new_token(cluster: Cluster, user: str, flavor: str = "Small") -> str:
    """A fresh user whose current device has the size ``flavor``."""
    token = cluster.admin.call("create_token", {"user": user})["token"]
    cluster.client(token).call("set_device_flavor", {"flavor": flavor})
    return token


@pytest.fixture
def fronts(cluster):
    """``fronts(token=None)`` -> a new :class:`Front` (default: the cluster's token)."""
    made: list[Front] = []

    def make(token: str | None = None) -> Front:
        front = Front(cluster, token or cluster.token, pid=os.getpid() + len(made))
        made.append(front)
        return front

    yield make
    for front in made:
        front.close()
