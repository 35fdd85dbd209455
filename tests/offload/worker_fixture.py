"""Real worker daemons for the offload runtime tests, started without a master.

``start_worker`` runs ``python -m daemons.worker.main`` on a launch spec, as an agent would, on a
free loopback port; ``clean_env`` is the environment of such a process or of a front program.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from daemons.loopback_ports import free_port
from daemons.worker.spec import WorkerSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
FRONT_PROGRAM = Path(__file__).with_name("front_program.py")
WORKER_MEMORY_CAP = 256 << 20
SECRET = "offload-test-secret"


@dataclass
class Worker:
    proc: subprocess.Popen
    address: str
    log: Path

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def clean_env(tmp: Path) -> dict:
    """This repository on the path and an empty config: no user setting leaks into a test."""
    config = tmp / "moai.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
    env.update(PYTHONPATH=str(REPO_ROOT), MOAI_CONFIG=str(config))
    return env


def start_worker(tmp: Path, memory_cap: int = WORKER_MEMORY_CAP) -> Worker:
    tmp.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    spec = WorkerSpec(job_id=1, gpu=0, rank=0, world_size=1, job_secret=SECRET, rendezvous="",
                      memory_cap=memory_cap, bind=address)
    spec.save(tmp / "spec.json")
    log = tmp / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons.worker.main", "--spec", str(tmp / "spec.json")],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(tmp), cwd=REPO_ROOT)
    return Worker(proc, address, log)
