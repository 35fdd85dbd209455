"""One device's layout for values that arrive contiguous.

The wire sends a tensor's values contiguous, and an all-gather leaves a multi-worker job's tensor
contiguous, where one device copies a tensor in torch's ``preserve_format``: a dense tensor keeps
its strides, another (a slice, a split's piece) gets dense strides in the order of its own. An
op's results follow its inputs' layout, so a later ``view`` that one device's layout allows fails
on another. The front (offload/dispatch.py) and the multi-worker executor (spmd.py) lay such
values out again with the strides one device has.
"""
from __future__ import annotations

import torch


def preserved_strides(like: torch.Tensor) -> tuple[int, ...]:
    """The strides of a copy of ``like`` in ``preserve_format`` (CUDA's ``.cpu()``, ``.to()``,
    ``clone()``): ``empty_like``'s, which torch's copies allocate with."""
    return torch.empty_like(torch.empty_strided(like.shape, like.stride(), device="meta")).stride()


def laid_out_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (of ``like``'s shape) laid out as one device's copy of ``like``."""
    if values.stride() == like.stride():
        return values
    strides = preserved_strides(like)
    if values.stride() == strides:
        return values
    return torch.empty_strided(like.shape, strides, dtype=values.dtype, device=values.device).copy_(values)
