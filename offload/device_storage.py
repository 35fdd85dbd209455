"""What ``untyped_storage()`` and ``data_ptr()`` of a device tensor give: a storage of cuda:0 at an
address of its own.

The remote tensors' memory is the workers', so no host address exists for it; but programs and
libraries tell storages apart, and find tied or shared weights, by these addresses (transformers'
``save_pretrained``, safetensors' shared-tensor check, ``x.data_ptr() == y.data_ptr()``). A
wrapper tensor's own storage refuses ``data_ptr()``. So each storage of the device -- a meta
storage that the device tensors' metas share exactly as the remote tensors share theirs
(offload/dispatch.py) -- is given, at its first such question, an address range of its size in a
virtual address space no host memory is mapped at, aligned as CUDA's allocator aligns blocks.
Views of one storage get the same storage and addresses inside its range, as on CUDA.
"""
from __future__ import annotations

import threading
import weakref

import torch

# Where the ranges begin: far above any host or device address a program could meet, and the
# whole space below 2**63, so an address fits a signed 64-bit integer as CUDA's do.
_FIRST_ADDRESS = 1 << 60
_ALIGNMENT = 512  # CUDA's caching allocator rounds blocks to 512 bytes


class DeviceStorage(torch.UntypedStorage):
    """The storage of device tensors. Its bytes are not on this host: it answers for the storage's
    place and size (``data_ptr``, ``nbytes``, ``device``), not for its contents."""

    _address: int

    @property
    def device(self) -> torch.device:
        from offload.tensor import VISIBLE_DEVICE
        return VISIBLE_DEVICE

    def data_ptr(self) -> int:
        return self._address

    def _refuse_contents(self, *args, **kwargs):
        raise NotImplementedError("the storage of a cuda:0 tensor on the virtual device holds no "
                                  "host copy of its bytes; read them through the tensor (.cpu())")

    # __reduce__: torch.save(storage) pickles a storage of a type it does not list by saving it
    # again, which recursed without end.
    cpu = tolist = __getitem__ = __setitem__ = copy_ = fill_ = resize_ = __reduce__ = _refuse_contents


class _AddressSpace:
    def __init__(self):
        self._next = _FIRST_ADDRESS
        self._lock = threading.Lock()
        # The metas' storage object lives exactly as long as the storage (torch keeps one Python
        # object per storage), so the entry goes with the last tensor using it.
        self._storages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def storage_of(self, meta: torch.Tensor) -> DeviceStorage:
        key = meta.untyped_storage()
        with self._lock:
            storage = self._storages.get(key)
            if storage is None:
                nbytes = key.nbytes()
                storage = DeviceStorage(nbytes, device="meta")
                storage._address = self._next
                self._next += -(-max(nbytes, 1) // _ALIGNMENT) * _ALIGNMENT
                self._storages[key] = storage
            return storage


ADDRESSES = _AddressSpace()
