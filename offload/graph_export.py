"""``torch.export`` of a model on the virtual device: refused by name, with the way that works.

Export traces the model with fake tensors of its inputs' device, and torch builds those for
``cuda``, which this torch has no kernels for: the process aborted inside torch's C++ (terminate,
"PyTorch is not linked with support for cuda devices"). An exported program is a deployment
artifact, made as well from a CPU copy of the model, which is what the error says.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_leaves

from offload.tensor import RemoteTensor

# Not torch._dynamo.export (deprecated for torch.export): importing dynamo to wrap it would cost
# every offloaded process 1.3 s at startup.
_ENTRY_POINTS = ("export", "draft_export")


def _on_the_device(mod, args, kwargs) -> bool:
    tensors = list(tree_leaves((args, kwargs)))
    if isinstance(mod, torch.nn.Module):
        tensors += [*mod.parameters(), *mod.buffers()]
    return any(isinstance(t, RemoteTensor) for t in tensors)


def _refused(name: str, original):
    @functools.wraps(original)
    def export(mod, *args, **kwargs):
        if _on_the_device(mod, args, kwargs):
            raise NotImplementedError(
                f"{name}: a model or inputs on the virtual cuda:0 device cannot be exported (export "
                "traces with fake tensors of the device, which the MoAI Platform does not provide); "
                "export a CPU copy instead: torch.export.export(copy.deepcopy(model).cpu(), "
                "tuple(x.cpu() for x in args))")
        return original(mod, *args, **kwargs)
    export._moai_refuses_device = True
    return export


def install():
    for name in _ENTRY_POINTS:
        original = getattr(torch.export, name, None)
        if original is None or getattr(original, "_moai_refuses_device", False):
            continue
        setattr(torch.export, name, _refused(f"torch.export.{name}", original))
