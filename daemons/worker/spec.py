"""The launch spec of one worker: written by its agent, read by the worker at start."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerSpec:
    job_id: int
    gpu: int                  # index of the GPU on this node (virtual on CPU-only nodes)
    rank: int                 # rank in the job's torch.distributed group
    world_size: int
    job_secret: str           # the token fronts must present
    rendezvous: str           # tcp://host:port of the job's TCPStore (rank 0 hosts it)
    memory_cap: int           # bytes the worker may hold; past it ops fail with an OOM error
    bind: str                 # tcp://host:port this worker serves
    device: str = "cpu"       # "cuda:<i>" on a GPU node
    threads: int = 1          # torch intra-op threads (CPU workers)
    collective_timeout_s: float = 300.0  # a peer silent this long in a collective fails the job
    out_of_step_s: float = 30.0   # after an error, how long a rank waits for its peers to fail alike

    def save(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "WorkerSpec":
        return cls(**json.loads(Path(path).read_text()))
