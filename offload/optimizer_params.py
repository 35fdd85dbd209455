"""Optimizers made before ``model.to("cuda")`` train the model that moved.

On CUDA, moving a module keeps its ``Parameter`` objects and swaps their data in place, so an
optimizer made before ``model.cuda()`` (a common order) holds the parameters that train. Here
the move keeps them too (offload/parameter_swap.py), except where torch refuses the swap: the
move then makes a new parameter, and such an optimizer would go on updating the host tensor
while the device's never changed, silently. So every optimizer is remembered when it is made,
and a move points its parameter groups, and any state it holds, at the new parameters.
"""
from __future__ import annotations

import functools
import weakref

import torch

_optimizers: weakref.WeakSet = weakref.WeakSet()


def install():
    """Idempotent."""
    original = torch.optim.Optimizer.__init__
    if getattr(original, "_moai_remembers", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _optimizers.add(self)

    __init__._moai_remembers = True
    torch.optim.Optimizer.__init__ = __init__


def repoint(moved: dict[int, torch.Tensor]):
    """``moved``: the new parameter of each parameter a move replaced, by the old one's id."""
    if not moved:
        return
    for optimizer in list(_optimizers):
        for group in optimizer.param_groups:
            group["params"] = [moved.get(id(p), p) for p in group["params"]]
        for p in [p for p in optimizer.state if id(p) in moved]:
            optimizer.state[moved[id(p)]] = optimizer.state.pop(p)
