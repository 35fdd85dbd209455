"""One device's layout for values that arrive contiguous.

The wire sends a tensor's values contiguous, and an all-gather leaves a multi-worker job's tensor
contiguous, where one device keeps the tensor's own strides: CUDA's ``.cpu()`` keeps a dense
tensor's layout, and an op's results follow its inputs' layout, so a later ``view`` that one
device's layout allows fails on another. The front (offload/dispatch.py) and the multi-worker
executor (spmd.py) lay such values out again with the strides one device has.
"""
from __future__ import annotations

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false


def dense(like: torch.Tensor) -> bool:
    """Whether ``like``'s strides cover its storage once: overlapping ones (an expanded tensor)
    cannot be written, and one device copies such a tensor contiguous too."""
    return is_non_overlapping_and_dense_or_false(torch.empty_strided(like.shape, like.stride(), device="meta"))


def laid_out_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (of ``like``'s shape) with ``like``'s strides when they are dense, else as they are."""
    if values.stride() == like.stride() or not dense(like):
        return values
    return torch.empty_strided(like.shape, like.stride(), dtype=values.dtype, device=values.device).copy_(values)
