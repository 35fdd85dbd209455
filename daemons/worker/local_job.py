"""One job's workers on this machine, without master or agent: the test bed of automatic parallelism.

``LocalJob(world_size)`` writes a launch spec per rank exactly as an agent would (free loopback
ports, the rank-0 TCPStore as rendezvous), starts each worker daemon (``daemons.worker.main``) as
its own process and talks to them with ``wire.Client`` as the front does: every streamed message
goes to every worker (SPMD), a fetch is answered with data by rank 0. ``replay`` streams a
recording of ``op_recording``. Used by tests/parallel and scripts/bench_scaling.py.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from daemons import wire
from daemons.loopback_ports import free_port
from daemons.worker.spec import WorkerSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0         # N cold torch imports on a 2-core machine, then the group forms
CALL_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """Run in a worker before it starts: it is killed when the process that started it dies. A
    test run killed mid-job (a CI timeout, Ctrl-C twice) left its workers serving on as orphans,
    still running the ops queued for them (LocalJob's ``__exit__`` never ran; an agent's workers
    are stopped by supervisord instead)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalJob:
    def __init__(self, world_size: int, *, memory_cap: int = 1 << 40, threads: int = 1,
                 collective_timeout_s: float = 60.0, out_of_step_s: float = 30.0):
        self.world_size = world_size
        self.secret = secrets.token_hex(8)
        self._dir = tempfile.TemporaryDirectory(prefix="moai-job-")
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        self.specs = [WorkerSpec(job_id=1, gpu=rank, rank=rank, world_size=world_size,
                                 job_secret=self.secret, rendezvous=rendezvous,
                                 memory_cap=memory_cap, bind=f"tcp://127.0.0.1:{free_port()}",
                                 threads=threads, collective_timeout_s=collective_timeout_s,
                                 out_of_step_s=out_of_step_s)
                      for rank in range(world_size)]
        self.procs: list[subprocess.Popen] = []
        self.clients: list[wire.Client] = []

    # --- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "LocalJob":
        workdir = Path(self._dir.name)
        config = workdir / "moai.toml"     # keeps a user's ~/.moai/moai.toml out of the test
        config.write_text("")
        env = {**os.environ, "MOAI_CONFIG": str(config), "PYTHONPATH": str(REPO_ROOT),
               "MOAI_LOG_LEVEL": os.environ.get("MOAI_LOG_LEVEL", "WARNING")}
        try:
            for spec in self.specs:
                path = workdir / f"gpu-{spec.gpu}.json"
                spec.save(path)
                log = open(workdir / f"worker-{spec.rank}.log", "wb")
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "daemons.worker.main", "--gpu", str(spec.gpu),
                     "--spec", str(path)], env=env, cwd=REPO_ROOT, stdout=log, stderr=log,
                    preexec_fn=_die_with_parent))
                log.close()
                self.clients.append(wire.Client(spec.bind, self.secret, timeout_s=CALL_TIMEOUT_S,
                                                max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES))
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for client, proc in zip(self.clients, self.procs):
            if proc.poll() is None:
                try:
                    client.call("shutdown", timeout_s=STOP_TIMEOUT_S)
                except wire.WireError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for client in self.clients:
            client.close()
        self._dir.cleanup()

    def _wait_ready(self):
        """A worker answers only once the whole process group has formed. One that exits first
        (a port taken, an import failing) fails the job at once, with its log, and a group that
        never forms fails it with every worker's log: not a bare timeout."""
        ids = [client.send("hello") for client in self.clients]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for client, msg_id in zip(self.clients, ids):
            while True:
                try:
                    client.wait(msg_id, 1.0, abandon=False)
                    break
                except wire.TransportTimeout:
                    dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        ranks = dead or range(self.world_size)
                        logs = "\n".join(f"--- worker {r} ---\n{self.log(r)[-2000:]}" for r in ranks)
                        why = f"worker(s) {dead} exited" if dead else f"no hello within {READY_TIMEOUT_S:g} s"
                        raise RuntimeError(f"the local job of {self.world_size} did not start: {why}\n{logs}")

    def log(self, rank: int) -> str:
        return (Path(self._dir.name) / f"worker-{rank}.log").read_text(errors="replace")

    def kill(self, rank: int):
        """A worker dies without warning (SIGKILL); the job goes on talking to the others."""
        self.procs[rank].kill()
        self.procs[rank].wait()

    def _live(self) -> list[wire.Client]:
        return [c for c, p in zip(self.clients, self.procs) if p.poll() is None]

    # --- the front's side of the protocol -----------------------------------------------------------
    def send(self, msg_type: str, body: dict):
        """A streamed message (no reply), to every live worker."""
        for client in self._live():
            client.send(msg_type, body)

    def call(self, msg_type: str, body: dict, timeout_s: float | None = None) -> list:
        """A request every live worker answers; returns their replies, lowest rank first."""
        live = self._live()
        ids = [client.send(msg_type, body) for client in live]
        return [client.wait(i, timeout_s) for client, i in zip(live, ids)]

    def fetch(self, tid: int, timeout_s: float | None = None) -> torch.Tensor:
        return self.call("fetch", {"id": tid, "seq": 0}, timeout_s)[0]["tensor"]

    def sync(self, timeout_s: float | None = None) -> list:
        return self.call("sync", {"seq": 0}, timeout_s)

    def replay(self, steps: list) -> list[tuple[torch.Tensor, float]]:
        """Stream a recording; returns each value read back with the time it came back."""
        fetched = []
        for step in steps:
            if step[0] == "put":
                _, tid, tensor, shard = step
                self.send("put", {"id": tid, "tensor": tensor, **({"shard": shard} if shard else {})})
            elif step[0] == "free":
                self.send("free", {"ids": step[1]})
            elif step[0] == "ops":
                self.send("run_ops", {"ops": step[1]})
            else:
                fetched.append((self.fetch(step[1]), time.perf_counter()))
        return fetched
