"""The process-wide torch settings a program may change that change what its device computes, or
how fast: deterministic algorithms, TF32 matmuls and convolutions, cuDNN's autotuning.

The program changes them in the front process; the front forwards each change, in the op stream's
order, as a ``moai::setting`` record (offload/torch_settings.py, docs/PROTOCOL.md), and the worker
makes the same change to its own torch here. So ``torch.backends.cudnn.benchmark = True`` or
``torch.set_float32_matmul_precision("high")`` speed up a GPU worker as they would the program's
own GPU, and ``torch.use_deterministic_algorithms(True)`` holds on it.

Only the settings named here can be changed, with plain values: a record names them by strings,
never by code.
"""
from __future__ import annotations

import os
import re

import torch
import torch.backends.cuda
import torch.backends.cudnn
import torch.utils.deterministic

SETTING_OP = "moai::setting"   # args [target, name, args, kwargs]

# torch's functions, by name: called with the program's arguments.
FUNCTIONS = frozenset({"set_float32_matmul_precision", "use_deterministic_algorithms",
                       "set_deterministic_debug_mode"})
# Objects of torch, by their dotted path: the attributes set on them.
ATTRIBUTES = {
    "torch.backends.cudnn": frozenset({"enabled", "benchmark", "benchmark_limit", "deterministic",
                                       "allow_tf32"}),
    "torch.backends.cudnn.conv": frozenset({"fp32_precision"}),
    "torch.backends.cuda.matmul": frozenset({"allow_tf32", "fp32_precision",
                                             "allow_fp16_reduced_precision_reduction",
                                             "allow_bf16_reduced_precision_reduction"}),
    "torch.utils.deterministic": frozenset({"fill_uninitialized_memory"}),
}
# cuBLAS is deterministic only with this set (torch's error says so): the program sets it in its
# own environment, where the worker's cuBLAS would never see it.
ENVIRONMENT = "os.environ"
CUBLAS_WORKSPACE_CONFIG = "CUBLAS_WORKSPACE_CONFIG"
_WORKSPACE_CONFIG = re.compile(r"(:\d+:\d+)+")
_VALUES = (bool, int, str, type(None))


def target_object(target: str):
    """The object a path of ``ATTRIBUTES`` names."""
    obj = torch
    for part in target.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def apply(target: str, name: str, args: list, kwargs: dict) -> str:
    """Make the change a record names; returns it in words. ValueError for anything not above."""
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("a setting's args must be a list and its kwargs a map")
    values = list(args) + list(kwargs.values())
    if not all(type(v) in _VALUES for v in values) or not all(type(k) is str for k in kwargs):
        raise ValueError("a setting takes only booleans, integers, strings and nil")
    if target == "torch" and name in FUNCTIONS:
        getattr(torch, name)(*args, **kwargs)
        shown = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        return f"torch.{name}({shown})"
    if len(args) != 1 or kwargs:
        raise ValueError(f"{target}.{name} takes one value")
    if name in ATTRIBUTES.get(target, ()):
        setattr(target_object(target), name, args[0])
        return f"{target}.{name} = {args[0]!r}"
    if target == ENVIRONMENT and name == CUBLAS_WORKSPACE_CONFIG:
        if not (isinstance(args[0], str) and _WORKSPACE_CONFIG.fullmatch(args[0])):
            raise ValueError(f"{CUBLAS_WORKSPACE_CONFIG} must look like ':4096:8', not {args[0]!r}")
        os.environ[name] = args[0]
        return f"{CUBLAS_WORKSPACE_CONFIG}={args[0]}"
    raise ValueError(f"{target}.{name} is not a setting a program may change on the worker")
