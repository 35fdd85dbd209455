"""``torch.save`` / ``torch.load`` of virtual-device tensors, in stock torch's own file format.

Saving a device tensor downloads its data and writes it as a CPU storage tagged ``cuda:0``, the tag
a real GPU would give it. So files are portable both ways: a checkpoint saved here loads as CUDA
tensors on a real GPU machine with stock torch, and a checkpoint saved on a GPU server loads here
as device tensors. Loading follows ``map_location`` like real CUDA: none or ``"cuda"`` gives device
tensors (reported as ``cuda:0``), ``"cpu"`` or a ``lambda storage, loc: storage`` gives CPU tensors.

Three hooks do it: ``Tensor.__reduce_ex__`` (device tensors pickle their downloaded CPU copy), a
storage tagger/deserializer pair in torch.serialization's registry (the ``cuda`` tag), and
``torch._utils._rebuild_tensor_v2`` (a tensor whose storage came from a ``cuda`` location is
uploaded once rebuilt). The weights-only unpickler allows the rebuild function by its name, so
``torch.load(weights_only=True)`` takes the same path.
"""
from __future__ import annotations

import collections
import functools
import threading
import weakref

import torch
import torch._utils
import torch.serialization

from offload.device_mapping import virtual_device

# Lower than torch's cpu (10) and cuda (20) entries: ours decides first.
REGISTRY_PRIORITY = 5
SAVED_LOCATION = "cuda:0"

# C++ storage pointer -> weak reference, for storages that crossed between the device and a file.
_downloaded_for_saving: dict[int, weakref.ref] = {}
_to_upload_when_rebuilt: dict[int, weakref.ref] = {}
_original_reduce_ex = torch.Tensor.__reduce_ex__
_original_rebuild_tensor_v2 = torch._utils._rebuild_tensor_v2


def _remember(registry: dict, storage):
    key = storage._cdata
    registry[key] = weakref.ref(storage, lambda _ref: registry.pop(key, None))


def _recalls(registry: dict, storage) -> bool:
    ref = registry.get(storage._cdata)
    return ref is not None and ref() is storage


def _is_device_tensor(tensor: torch.Tensor) -> bool:
    # The front has no real GPU: a tensor that says it is CUDA lives on the virtual device.
    return tensor.device.type in ("cuda", torch._C._get_privateuse1_backend_name())


def _reduce_ex(self, protocol):
    if not _is_device_tensor(self):
        return _original_reduce_ex(self, protocol)
    host = self.detach().to("cpu")
    _remember(_downloaded_for_saving, host.untyped_storage())
    if getattr(self, "_is_param", False):
        return (torch._utils._rebuild_parameter,
                (host, self.requires_grad, collections.OrderedDict()))
    if self.requires_grad and self.is_leaf:
        host.requires_grad_(True)
    return _original_reduce_ex(host, protocol)


def _tag(storage) -> str | None:
    return SAVED_LOCATION if _recalls(_downloaded_for_saving, storage) else None


def _deserialize(storage, location: str):
    if not location.startswith("cuda"):
        return None
    # map_device refuses cuda:1 and above with the same message a .to("cuda:1") would get.
    from offload.device_mapping import map_device
    map_device(location)
    _remember(_to_upload_when_rebuilt, storage)
    return storage


@functools.wraps(_original_rebuild_tensor_v2)
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    untyped = getattr(storage, "_untyped_storage", storage)
    if not _recalls(_to_upload_when_rebuilt, untyped):
        return _original_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           backward_hooks, metadata)
    host = _original_rebuild_tensor_v2(storage, storage_offset, size, stride, False,
                                       backward_hooks, metadata)
    if getattr(untyped, "_torch_load_uninitialized", False):
        # The legacy format (_use_new_zipfile_serialization=False) reads the bytes into the
        # storages after unpickling: the device tensor is filled then (_legacy_load below).
        device_tensor = torch.empty_like(host, device=virtual_device())
        _legacy_fills.pending.append((device_tensor, host))
        return device_tensor.requires_grad_(requires_grad)
    return host.to(virtual_device()).requires_grad_(requires_grad)


_original_legacy_load = torch.serialization._legacy_load
_legacy_fills = threading.local()


@functools.wraps(_original_legacy_load)
def _legacy_load(*args, **kwargs):
    outer = getattr(_legacy_fills, "pending", None)
    _legacy_fills.pending = []
    try:
        result = _original_legacy_load(*args, **kwargs)
        with torch.no_grad():
            for device_tensor, host in _legacy_fills.pending:
                device_tensor.copy_(host)
        return result
    finally:
        _legacy_fills.pending = outer


def _storage_cuda(self, device=None, non_blocking=False):
    """``UntypedStorage.cuda()``: a storage cannot live on the virtual device (its tensors hold
    none on the front), so the bytes stay here and a tensor rebuilt from them while loading is
    uploaded -- what the old idiom ``torch.load(f, map_location=lambda s, loc: s.cuda())`` needs
    (stock torch would try to initialize CUDA and fail)."""
    from offload.device_mapping import map_device
    map_device(torch.device("cuda", device) if device else torch.device("cuda"))  # cuda:1: refused
    _remember(_to_upload_when_rebuilt, self)
    return self


def install():
    """Hook saving and loading (idempotent)."""
    if torch.Tensor.__reduce_ex__ is _reduce_ex:
        return
    torch.UntypedStorage.cuda = _storage_cuda
    torch.Tensor.__reduce_ex__ = _reduce_ex
    torch.serialization.register_package(REGISTRY_PRIORITY, _tag, _deserialize)
    torch._utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch.serialization._legacy_load = _legacy_load
