"""``torch.profiler`` with CUDA activity on the virtual device: the program's CPU side, quietly.

Performance scripts profile a step with ``activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]``
(or the older ``use_cuda=True`` / ``use_device="cuda"``). This CPU build records no CUDA events:
since ``torch.cuda.is_available()`` says True, torch took its fallback, which failed on every op
with a C++ warning and stack trace. The device's kernels run on the workers, so there are no
device events in this process to record: the profile records the CPU activity (also when only
CUDA's was asked for), with one warning that says so; ``sort_by="cuda_time_total"`` still works
(zeros).
"""
from __future__ import annotations

import functools
import warnings

import torch

_NO_DEVICE_EVENTS = ("torch.profiler: the virtual cuda:0 device's kernels run on the MoAI workers, so the "
                     "profile records this program's CPU activity only (no CUDA events)")


def install():
    """Idempotent."""
    profile = torch.autograd.profiler.profile
    original = profile.__init__
    if getattr(original, "_moai_cpu_only", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, use_cuda=False, use_device=None, **kwargs):
        if use_cuda or use_device == "cuda":
            warnings.warn(_NO_DEVICE_EVENTS, stacklevel=2)
            use_cuda, use_device = False, None
            kwargs["use_cpu"] = True   # a profile of CUDA activity alone would have nothing to record
        original(self, *args, use_cuda=use_cuda, use_device=use_device, **kwargs)

    __init__._moai_cpu_only = True
    profile.__init__ = __init__
