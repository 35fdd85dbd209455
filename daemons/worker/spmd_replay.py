"""Run a recorded op stream (``op_recording``) on N local gloo workers through ``SpmdBackend``.

The front-less test bed of automatic parallelism, used by tests/parallel and
scripts/bench_scaling.py: N processes on loopback form a job's process group, each takes the same
recording, and rank 0 reports the values the front would have fetched, the worker's peak memory
(bytes of this worker's shards held in its tensor table) and the ops that fell back.
"""
from __future__ import annotations

import socket
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from daemons.wire import RemoteRef
from daemons.worker.spec import WorkerSpec

REPLAY_TIMEOUT_S = 120.0


@dataclass
class ReplayResult:
    fetched: dict[int, torch.Tensor]         # handle id -> full value (rank 0's view)
    peak_bytes: int                          # max over ranks of the table's local bytes
    fallbacks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0                     # rank 0's time spent in the ops (no setup)
    comm_bytes: int = 0                      # bytes one worker sends in collectives (ring cost)


# Bytes one worker sends, per byte of the whole tensor, in ring algorithms over N workers.
_RING_COST = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "all_to_all_single": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


class CommMeter(TorchDispatchMode):
    """Adds up the collectives DTensor issues (it runs them as ``_c10d_functional`` ops)."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented            # let DTensor decompose it; its collectives come back
        out = func(*args, **(kwargs or {}))
        cost = _RING_COST.get(func._overloadpacket.__name__)
        if cost is not None:
            whole = out if "gather" in func._overloadpacket.__name__ else args[0]
            self.bytes += int(cost(self.world_size) * whole.numel() * whole.element_size())
        return out


def resolve_op(name: str):
    """``"aten::add.Tensor"`` / ``"aten::mm"`` -> the aten OpOverload."""
    namespace, _, rest = name.partition("::")
    packet_name, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet_name), overload or "default")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(backend, table: dict) -> int:
    storages = {}
    for t in table.values():
        local = backend.local(t)
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _worker(rank, world_size, port, steps, fetch_ids, memory_cap, queue):
    torch.set_num_threads(1)
    try:
        from daemons.worker.spmd import SpmdBackend
        spec = WorkerSpec(job_id=0, gpu=rank, rank=rank, world_size=world_size, job_secret="",
                          rendezvous=f"tcp://127.0.0.1:{port}", memory_cap=memory_cap, bind="")
        backend = SpmdBackend(spec)
        table, fetched, peak, seconds = {}, {}, 0, 0.0
        meter = CommMeter(world_size)
        with meter:
            for step in steps:
                start = time.perf_counter()
                if step[0] == "put":
                    _, tid, tensor, hint = step
                    table.update(backend.put(tid, tensor, hint))
                elif step[0] == "free":
                    for tid in step[1]:
                        table.pop(tid, None)
                    backend.forget(step[1])
                else:
                    for _seq, name, args, kwargs, out in step[1]:
                        deref = lambda x: table[x.id] if isinstance(x, RemoteRef) else x  # noqa: E731
                        result = backend.run(resolve_op(name), *tree_map(deref, (args, kwargs)))
                        for tid, value in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                            if tid is not None:
                                table[tid] = value
                        peak = max(peak, _local_bytes(backend, table))
                        for tid in fetch_ids.intersection(t for t in tree_flatten(out)[0] if t):
                            # numpy pickles by value; a tensor would be shared through an fd that dies with us
                            fetched[tid] = backend.full_tensor(table[tid]).numpy().copy()
                seconds += time.perf_counter() - start
        peaks = [None] * world_size
        torch.distributed.all_gather_object(peaks, peak)
        if rank == 0:
            queue.put(ReplayResult(fetched, max(peaks), dict(backend.fallbacks), seconds,
                                   meter.bytes))
        backend.close()
    except Exception:
        queue.put(RuntimeError(f"rank {rank}:\n{traceback.format_exc()}"))


def replay(steps: list, world_size: int, fetch_ids, memory_cap: int = 1 << 40) -> ReplayResult:
    """Run ``steps`` on ``world_size`` fresh processes; ``fetch_ids`` are fetched when produced."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, steps, set(fetch_ids), memory_cap, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=REPLAY_TIMEOUT_S)
    finally:
        for p in procs:
            p.join(timeout=10 if p is procs[0] else 2)
            if p.is_alive():
                p.kill()
    if isinstance(result, Exception):
        raise result
    result.fetched = {tid: torch.from_numpy(a) for tid, a in result.fetched.items()}
    return result

