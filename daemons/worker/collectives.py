"""The collectives DTensor's redistributions call, wrapped once per worker process: counted, and
carried in a dtype the process group can move.

The wrapped functions are looked up on ``torch.distributed._functional_collectives`` at each call,
so wrapping the module's attributes sees them all. Bytes are this rank's input: what it puts into
the collective, the measure plain data parallelism's "gradients all-reduced once" is stated in.

gloo moves neither int16, the unsigned ints wider than a byte nor the float8 types (NCCL has no
int16 or uint16 either): a tensor of one of them split over workers failed its first all-gather
("Invalid scalar type"), so it could not even be read back. Such a tensor travels as a dtype that
holds each of its values exactly and comes back as its own: int16 and uint16 as int32, uint32 as
int64, float8 as float32; uint64 bit for bit as int64 (a sum wraps around as the unsigned one does).
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.distributed._functional_collectives as funcol

COUNTED = ("all_reduce", "all_gather_single", "reduce_scatter_single")
BYTES: Counter[str] = Counter()

WIDENED = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64,
           **{dtype: torch.float32 for dtype in (torch.float8_e4m3fn, torch.float8_e5m2,
                                                  torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)}}
REINTERPRETED = {torch.uint64: torch.int64}


def install():
    """Wrap the collectives (idempotent: a worker builds its backend once, tests several times)."""
    for name in COUNTED:
        collective = getattr(funcol, name)
        if getattr(collective, "_moai_wrapped", False):
            continue

        @functools.wraps(collective)
        def wrapped(tensor, *args, _name=name, _collective=collective, **kwargs):
            BYTES[_name] += tensor.numel() * tensor.element_size()
            dtype = tensor.dtype
            if dtype in WIDENED:
                return _collective(tensor.to(WIDENED[dtype]), *args, **kwargs).to(dtype)
            if dtype in REINTERPRETED:
                return _collective(tensor.view(REINTERPRETED[dtype]), *args, **kwargs).view(dtype)
            return _collective(tensor, *args, **kwargs)
        wrapped._moai_wrapped = True
        setattr(funcol, name, wrapped)
