"""SPMD execution of one job's op stream on N workers: the worker side of automatic parallelism.

Every worker of a job receives the same op stream (docs/PROTOCOL.md, SPMD) and runs it on
DTensors over a 1-D DeviceMesh of the job's workers; DTensor does the sharding propagation and
the collectives. Batch inputs are ``Shard(0)`` and parameters ``Replicate()`` (data parallel), or
``Shard(0)`` when memory is short (ZeRO-3); the rule is in ``placement.py``. Gradients of
replicated parameters come out ``Partial`` and DTensor reduces them where they are used.

The seam with the executor (``Executor`` builds one ``SpmdBackend`` when ``world_size > 1``):

    backend = SpmdBackend(spec)                 # joins the process group, builds the mesh
    table.update(backend.put(id, tensor, hint)) # upload; may re-place earlier params (see
                                                #   placement.py), hence a dict of entries
    out = backend.run(op, args, kwargs)         # args hold the table's DTensors; store the
                                                #   outputs by the record's out ids (an in-place
                                                #   op returns its input object)
    full = backend.full_tensor(t)               # every rank calls it (fetch is in the stream);
                                                #   rank 0's reply carries the data
    backend.local(t)                            # this worker's shard, for memory accounting
    backend.forget(ids)                         # on free
    backend.close()

Every tensor the backend hands out is a DTensor on the job's mesh, so ops never mix DTensors
with plain tensors. An op DTensor cannot shard (no sharding strategy) falls back: its inputs are
made whole, it runs locally on every worker, and its outputs are ``Replicate()`` (an in-place
output is written back into its input in the input's own placement). Correct, but it costs
an all-gather and leaves replicated work; ``fallbacks`` counts them by op name.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.utils._pytree import tree_flatten, tree_map

from daemons.worker.placement import PlacementPolicy
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.worker.spmd")


class SpmdBackend:
    """The job's process group and mesh, and DTensor execution of its ops on this worker."""

    def __init__(self, spec: WorkerSpec):
        self.device = torch.device(spec.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=spec.rendezvous, rank=spec.rank,
                                    world_size=spec.world_size)
        self.mesh = init_device_mesh(self.device.type, (spec.world_size,))
        self.policy = PlacementPolicy(spec.world_size, spec.memory_cap)
        self.fallbacks: Counter[str] = Counter()
        self._params: dict[int, DTensor] = {}   # uploads hinted "param": re-placed on a switch

    # --- uploads ----------------------------------------------------------------------------------
    def put(self, tid: int, tensor: torch.Tensor, hint: dict | None = None) -> dict[int, DTensor]:
        """Place an upload (the same full tensor arrives at every rank); returns table entries."""
        kind = (hint or {}).get("kind")
        switched = self.policy.admit(kind, tensor.numel() * tensor.element_size())
        placement = self.policy.placement(kind, tensor.dim())
        placed = self._slice(tensor.to(self.device), placement)
        entries = {tid: placed}
        if switched:
            log.info("parameters (%d bytes) exceed the replicated budget: sharding them (ZeRO-3)",
                     self.policy.param_bytes)
            for pid, param in self._params.items():
                entries[pid] = param.redistribute(self.mesh, [self.policy.placement(kind, param.dim())])
        if kind == "param":
            self._params.update((pid, entries[pid]) for pid in entries)
        return entries

    def forget(self, ids):
        for tid in ids:
            self._params.pop(tid, None)

    def _slice(self, full: torch.Tensor, placement) -> DTensor:
        # Every rank holds the same full tensor: cutting out this rank's piece needs no traffic.
        return self._replicated(full).redistribute(self.mesh, [placement])

    def _replicated(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
            return DTensor.from_local(t.to(self.device), self.mesh, [Replicate()], run_check=False)
        return t

    # --- ops --------------------------------------------------------------------------------------
    def run(self, op, args, kwargs):
        """Run one aten op on DTensor arguments; falls back to whole tensors where DTensor can't."""
        args, kwargs = tree_map(self._replicated, (tuple(args), kwargs))
        if not any(isinstance(t, DTensor) for t in tree_flatten((args, kwargs))[0]):
            return tree_map(self._replicated, op(*args, **kwargs))   # factories: arange, zeros...
        try:
            return op(*args, **kwargs)
        except NotImplementedError as exc:
            self.fallbacks[op.name()] += 1
            log.debug("no sharding for %s, running it on whole tensors: %s", op.name(), exc)
            return self._run_whole(op, args, kwargs)

    def _run_whole(self, op, args, kwargs):
        whole: dict[int, DTensor] = {}          # id(full tensor) -> the DTensor it came from

        def gather(t):
            if not isinstance(t, DTensor):
                return t
            full = t.full_tensor()
            whole[id(full)] = t
            return full

        out = op(*tree_map(gather, args), **tree_map(gather, kwargs))

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            source = whole.get(id(t))
            if source is None:
                return self._replicated(t)
            # In-place / out= result: write it back into the input, keeping its placement.
            source.to_local().copy_(self._slice(t, source.placements[0]).to_local())
            return source
        return tree_map(wrap, out)

    # --- results ----------------------------------------------------------------------------------
    @staticmethod
    def full_tensor(t) -> torch.Tensor:
        """The whole value (collective: every rank must call it at the same point of the stream)."""
        return t.full_tensor() if isinstance(t, DTensor) else t

    @staticmethod
    def local(t) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def close(self):
        if self.fallbacks:
            log.info("ops run on whole tensors (no sharding rule): %s", dict(self.fallbacks))
        if dist.is_initialized():
            dist.destroy_process_group()

