"""A module moved to or from the device keeps its ``Parameter`` objects, as it does on CUDA.

Native ``model.cuda()`` swaps each parameter's data in place, so whatever a program took before
the move names the moved parameter: an optimizer, a ``list(model.parameters())`` kept for
``clip_grad_norm_`` or an EMA, hooks registered on a parameter, attributes set on it. A host
tensor's data cannot become a virtual device tensor's (another kind of TensorImpl), so
``Module._apply`` makes a new parameter instead. After it, each old parameter object takes the
new one's contents through ``torch.utils.swap_tensors``, as torch's own
``swap_module_params_on_conversion`` does, here only for the moves that need it. Where torch
refuses the swap (a weak reference to the parameter, or its tensor held elsewhere, by a graph
still alive), the new parameter stays, and optimizers are pointed at it
(offload/optimizer_params.py).
"""
from __future__ import annotations

import torch

from offload import optimizer_params
from offload.tensor import OWN_ATTRIBUTES


def keep_identities(places: list[tuple]):
    """``places``: (module, name, parameter) of a module tree before ``Module._apply``. Each
    parameter the move replaced is itself again in all its places; a parameter several modules
    shared (tied embeddings) is one parameter again, which ``Module._apply`` made twice."""
    kept: dict[int, torch.Tensor] = {}   # id(old parameter) -> what all its places hold now
    replaced: dict[int, torch.Tensor] = {}
    for m, name, p in places:
        new = m._parameters.get(name)
        if new is p or new is None:
            continue
        if id(p) not in kept:
            kept[id(p)] = p if _swap(p, new) else new
            if kept[id(p)] is new:
                replaced[id(p)] = new
        m._parameters[name] = kept[id(p)]
    optimizer_params.repoint(replaced)


def _swap(old: torch.Tensor, new: torch.Tensor) -> bool:
    attributes = {k: v for k, v in old.__dict__.items() if k not in OWN_ATTRIBUTES}
    hooks, after_accumulation = old._backward_hooks, old._post_accumulate_grad_hooks
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        return False
    for k, v in attributes.items():   # swap_tensors exchanged the attribute dicts too
        old.__dict__.setdefault(k, v)
    # The hook dicts stay with the Python object, but torch registered them on the tensor it had:
    # setting them again registers them on the one it has now.
    if hooks is not None:
        old._backward_hooks = hooks
    if after_accumulation is not None:
        old._post_accumulate_grad_hooks = after_accumulation
    return True
