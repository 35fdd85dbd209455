"""Attention on a job of two workers runs batch-sharded with any mask a program passes.

DTensor has no rule for the CPU flash attention the workers run; spmd.py registers one. The mask
is a keyword argument of those kernels, which DTensor never moves for a rule, so the rule takes it
as it is placed and the backend places it first: sharded with the batch when it holds the batch
(a padding mask, (B, 1, S, S) or (B, H, S, S)), replicated when it is broadcast over it. Without
that, a mask with a batch ran on all-gathered whole tensors in every attention layer, forward
and backward. Two real worker backends (gloo, loopback) run the virtual device's attention ops
on DTensors, against the same ops on plain tensors.
"""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from daemons.loopback_ports import free_port
from daemons.worker import collectives, fused_attention, spmd
from daemons.worker.spec import WorkerSpec

B, H, S, D = 4, 2, 8, 4
FORWARD = fused_attention.KERNELS[fused_attention.FORWARD]
BACKWARD = fused_attention.KERNELS[fused_attention.BACKWARD]
MASKS = {   # name -> (mask, how the program's ops left it placed)
    "padding, sharded with the batch": ((B, 1, S, S), "shard"),
    "padding, replicated (built on the device)": ((B, 1, S, S), "replicate"),
    "padding, expanded from one row": ((1, 1, S, S), "expand"),
    "per head": ((B, H, S, S), "replicate"),
    "causal, broadcast": ((S, S), "replicate"),
    "none": (None, None),
}


def _rank(rank: int, rendezvous: str):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    spec = WorkerSpec(job_id=1, gpu=rank, rank=rank, world_size=2, job_secret="s",
                      rendezvous=rendezvous, memory_cap=1 << 30, bind="tcp://127.0.0.1:0",
                      collective_timeout_s=60.0)
    backend = spmd.SpmdBackend(spec)
    try:
        for name, (shape, placed) in MASKS.items():
            torch.manual_seed(0)
            # Heads viewed out of (B, S, H*D) projections, as models do: transposed layouts.
            q, k, v, grad = (torch.randn(B, S, H, D).transpose(1, 2) for _ in range(4))
            mask = None if shape is None else torch.randn(shape)
            if placed == "expand":
                mask = mask.expand(B, 1, S, S)
            # Placed as the projections are, then viewed (distribute_tensor of the transposed
            # view would make the pieces contiguous).
            sharded = [distribute_tensor(t.transpose(1, 2), backend.mesh, [Shard(0)]).transpose(1, 2)
                       for t in (q, k, v, grad)]
            dmask = mask
            if placed == "shard":
                dmask = distribute_tensor(mask, backend.mesh, [Shard(0)])
            elif mask is not None:
                dmask = DTensor.from_local(mask, backend.mesh, [Replicate()], run_check=False)
            dq, dk, dv, dgrad = sharded
            gathered_before = collectives.BYTES["all_gather_single"]
            out = backend.call(FORWARD, dq, dk, dv, dmask, 0.0, False, False)
            grads = backend.call(BACKWARD, dgrad, dq, dk, dv, dmask, [True, True, True, False],
                                 out[0], out[1], None, None, S, S, 0.0, False, out[6], out[7])
            gathered = collectives.BYTES["all_gather_single"] - gathered_before
            want = FORWARD(q, k, v, mask, 0.0, False, False)
            want_grads = BACKWARD(grad, q, k, v, mask, [True, True, True, False], want[0], want[1],
                                  None, None, S, S, 0.0, False, want[6], want[7])
            assert out[0].placements == (Shard(0),), (name, out[0].placements)
            assert all(g.placements == (Shard(0),) for g in grads[:3]), (name, [g.placements for g in grads[:3]])
            # The mask's own slice is cut locally; nothing is all-gathered.
            assert gathered == 0, (name, gathered)
            torch.testing.assert_close(backend.full_tensor(out[0]), want[0], rtol=0, atol=0,
                                       msg=lambda m: f"{name}: {m}")
            # Each piece laid out as the one-device kernel lays the output out (the front infers
            # a later view from that layout; batch is the outermost dim, so the strides agree).
            assert out[0].to_local().stride() == want[0].stride(), (name, out[0].to_local().stride())
            for got, expected in zip(grads[:3], want_grads[:3]):
                torch.testing.assert_close(backend.full_tensor(got), expected, rtol=0, atol=0,
                                           msg=lambda m: f"{name} gradient: {m}")
        assert not backend.fallbacks, dict(backend.fallbacks)
        # Both ranks leave the group together: rank 0 hosts its store, and a rank tearing the
        # group down after the store's host has exited aborted once (terminate called).
        torch.distributed.barrier()
    finally:
        backend.close()


def test_attention_with_any_mask_runs_batch_sharded():
    mp.spawn(_rank, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=2)
