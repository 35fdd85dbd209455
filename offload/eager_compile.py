"""``torch.compile`` on the virtual device: the program runs eagerly, with a warning.

Dynamo traces a function's Python frames into graphs for a backend that generates kernels
(Triton for CUDA): a front has no GPU to run them, and the tracing does not know the virtual
device's tensors (it fails deep inside dynamo). The device's ops already leave as one stream the
workers run, with attention and linear layers fused (offload/attention.py, offload/linear.py),
so a compiled model is the model itself here: ``torch.compile`` returns what it was given, as it
does under ``TORCH_COMPILE_DISABLE=1``, and ``nn.Module.compile()`` leaves the module as it was.
"""
from __future__ import annotations

import functools
import warnings

import torch

MESSAGE = ("torch.compile: the MoAI virtual device runs the program eagerly (its workers run the "
           "ops as they come); the model is returned uncompiled")


def install():
    original = torch.compile
    if getattr(original, "_moai_eager", False):
        return

    @functools.wraps(original)
    def compile(model=None, **options):
        warnings.warn(MESSAGE, stacklevel=2)
        if model is None:   # @torch.compile(mode=...) on a function
            return lambda fn: fn
        return model

    compile._moai_eager = True
    torch.compile = compile
