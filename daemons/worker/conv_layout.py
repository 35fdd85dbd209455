"""Convolutions' results laid out alike on the front and on a worker: CUDA's way.

torch's meta kernels of ``convolution`` and ``convolution_backward`` leave their results
contiguous (a meta tensor names no device to pick a backend by), while the CPU's and cuDNN's
kernels return them channels-last when the input or the weight is channels-last. The front, which
infers layouts on meta tensors, then held one layout and the worker another: a ``view`` the front
allowed failed on the worker, and ``is_contiguous(memory_format=torch.channels_last)`` answered
unlike CUDA. So both sides lay these results out by cuDNN's rule (``memory_format``): the front
its inferred outputs (offload/dispatch.py), a worker its computed ones (this module's kernels).
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from daemons.worker.kernel import Kernel

aten = torch.ops.aten
FORWARD = "aten::convolution"
BACKWARD = "aten::convolution_backward"


def memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """cuDNN's choice (``cudnn_conv_suggest_memory_format``): channels-last for a 2-d (3-d)
    convolution whose input or weight is channels-last, except in float64; else contiguous."""
    if torch.float64 in (input.dtype, weight.dtype):
        return torch.contiguous_format
    wanted = {4: torch.channels_last, 5: torch.channels_last_3d}.get(weight.dim())
    if wanted is not None and wanted in (suggest_memory_format(input), suggest_memory_format(weight)):
        return wanted
    return torch.contiguous_format


def laid_out(func, result, args):
    """``result`` of ``func`` (either op) on ``args``, its tensors in the convolution's format."""
    input, weight = (args[0], args[1]) if func is aten.convolution.default else (args[1], args[2])
    fmt = memory_format(input, weight)
    if isinstance(result, torch.Tensor):
        return result.contiguous(memory_format=fmt)
    grad_input, grad_weight, grad_bias = result
    return (None if grad_input is None else grad_input.contiguous(memory_format=fmt),
            None if grad_weight is None else grad_weight.contiguous(memory_format=fmt), grad_bias)


def _kernel(op):
    return Kernel(op, lambda *args, **kwargs: laid_out(op, op(*args, **kwargs), args))


KERNELS = {FORWARD: _kernel(aten.convolution.default), BACKWARD: _kernel(aten.convolution_backward.default)}
