"""TorchScript archives and the virtual device: a clear error where torch's would be obscure.

A scripted or traced module runs on device tensors (its ops reach the dispatcher as any others),
but an archive holds its tensors' bytes, read in C++ from their storages, which a device tensor
keeps on its workers; and a loaded module's tensors are TorchScript's own, not parameters that
``Module._apply`` can move. Stock torch said "PyTorch is not linked with support for cuda
devices" (``torch.jit.load(f, map_location="cuda")``), "Attempted to set the storage of a tensor
on device cuda:0 to a storage on different device moai:0" (``torch.jit.save``) and "param must be
a Parameter" (``loaded.cuda()``).
"""
from __future__ import annotations

import functools

import torch
import torch.jit

from offload.device_mapping import is_virtual

_ON_THE_HOST = ("TorchScript archives are saved and loaded on the CPU on the virtual device, and a "
                "loaded TorchScript module runs there; script or trace the Python module on cuda "
                "instead (torch.jit.script(model.cuda()))")


def _load(original):
    @functools.wraps(original)
    def load(f, map_location=None, *args, **kwargs):
        if map_location is not None and is_virtual(map_location):
            raise NotImplementedError(f"torch.jit.load(map_location={str(map_location)!r}): {_ON_THE_HOST}")
        return original(f, map_location, *args, **kwargs)
    return load


def _save(original):
    @functools.wraps(original)
    def save(m, *args, **kwargs):
        if any(t.is_cuda for t in m.state_dict().values()):
            raise NotImplementedError(f"torch.jit.save of a module with cuda:0 tensors: {_ON_THE_HOST}; "
                                      "save a CPU copy (copy.deepcopy(model).cpu())")
        return original(m, *args, **kwargs)
    return save


def refuse_moving(module: torch.nn.Module, error: AssertionError):
    """``Module._apply``'s error for a loaded TorchScript module moved to the device, reworded."""
    if isinstance(module, torch.jit.ScriptModule) and "must be a Parameter" in str(error):
        raise NotImplementedError(f"moving a TorchScript module to cuda:0: {_ON_THE_HOST}") from None


def install():
    if getattr(torch.jit.load, "_keeps_the_host", False):
        return
    torch.jit.load, torch.jit.save = _load(torch.jit.load), _save(torch.jit.save)
    torch.jit.load._keeps_the_host = True
