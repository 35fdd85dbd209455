"""torch's higher-order ops on device tensors: ``torch.cond``, ``while_loop``, ``scan``,
``associative_scan``, ``map``, ``flex_attention`` ...

A higher-order op asks each tensor subclass among its arguments for a rule of its own, and
without one raised "There was no rule registered for HOP cond and subclass RemoteTensor". Eager
CUDA runs such an op through its dense implementation (the CompositeExplicitAutograd kernel:
``cond`` evaluates the predicate and calls a branch, ``flex_attention`` computes the scores,
mask and softmax), whose tensor ops stream as any others; so does the virtual device. The ops
that exist for compilers only (Triton kernels, compiled code, functionalization) are left out:
a program meets them only inside ``torch.compile``, which runs eagerly here.
"""
from __future__ import annotations

import torch

from offload.tensor import RemoteTensor

EAGER_OPS = ("cond", "while_loop", "while_loop_stack_output", "scan", "associative_scan", "map_impl",
             "flex_attention", "flex_attention_backward", "foreach_map", "print")
_DENSE = torch._C.DispatchKey.CompositeExplicitAutograd


def register():
    for name in EAGER_OPS:
        hop = torch._ops._higher_order_ops.get(name)
        if hop is not None and RemoteTensor not in hop.python_key_table and _DENSE in hop.py_kernels:
            hop.py_impl(RemoteTensor)(hop.py_kernels[_DENSE])
