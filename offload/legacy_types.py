"""CUDA's legacy tensor types: ``torch.cuda.FloatTensor`` and its kin, and ``Tensor.type()``.

Older programs, and many still copied from them, pick a tensor type by device (``Tensor =
torch.cuda.FloatTensor if cuda else torch.FloatTensor``), build tensors with it
(``Tensor(n, 1).fill_(1.0)``, ``Tensor(array)``), convert with ``x.type(torch.cuda.LongTensor)``
or ``torch.set_default_tensor_type("torch.cuda.FloatTensor")``, and test ``isinstance(x,
torch.cuda.FloatTensor)`` or ``x.type() == "torch.cuda.FloatTensor"``. A CPU build's
``torch.cuda.*Tensor`` refuse all of it ("not compiled with CUDA"), and the virtual device's
tensors would name its backend in ``x.type()`` (``torch.moai.FloatTensor``). Here the types make
tensors of the virtual device, and its tensors are of these types, as on CUDA.

Installed and removed with offload/device_mapping.py's patches.
"""
from __future__ import annotations

import torch

from offload.device_mapping import virtual_device

DTYPES = {
    "FloatTensor": torch.float32, "DoubleTensor": torch.float64, "HalfTensor": torch.float16,
    "BFloat16Tensor": torch.bfloat16, "ByteTensor": torch.uint8, "CharTensor": torch.int8,
    "ShortTensor": torch.int16, "IntTensor": torch.int32, "LongTensor": torch.int64,
    "BoolTensor": torch.bool,
}
_CUDA = "torch.cuda."


class CudaTensorType(type):
    """The metaclass of the types: calling one makes a device tensor, and ``isinstance`` is true
    of the device's tensors of its dtype."""

    dtype: torch.dtype
    is_cuda = True
    is_sparse = False

    def __call__(cls, *args, **kwargs):
        sizes = args[0] if len(args) == 1 and isinstance(args[0], torch.Size) else args
        if not kwargs and all(type(a) is int for a in sizes):
            return torch.empty(sizes, dtype=cls.dtype, device=virtual_device())   # no upload
        host_type = getattr(torch, cls.__name__)    # data, a size, a storage: the CPU type reads it
        return host_type(*args, **kwargs).to(virtual_device())

    def __instancecheck__(cls, obj) -> bool:
        return (isinstance(obj, torch.Tensor) and obj.is_cuda and obj.dtype == cls.dtype
                and obj.layout == torch.strided)

    def __repr__(cls) -> str:
        return f"<class '{_CUDA}{cls.__name__}'>"


TYPES = {name: CudaTensorType(name, (), {"dtype": dtype, "__module__": "torch.cuda"})
         for name, dtype in DTYPES.items()}


def _type_name(t) -> str | None:
    """The dotted name a type argument gives, for the names and the types above and torch's own."""
    if isinstance(t, str):
        return t
    if isinstance(t, type):
        return f"{t.__module__}.{t.__name__}"
    return None


def tensor_type(original):
    def type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA + name.rsplit(".", 1)[1] if self.is_cuda else name
        name = _type_name(dtype)
        if name is not None and name.startswith(_CUDA):
            target = DTYPES.get(name[len(_CUDA):])
            if target is None:
                raise ValueError(f"invalid type: '{name}'")
            return self.to(virtual_device(), target, non_blocking=non_blocking)
        return original(self, dtype, non_blocking, **kwargs)
    type.__doc__ = original.__doc__
    return type


class DefaultTensorType:
    """``torch.set_default_tensor_type``: a CUDA type makes the virtual device the default one
    (``torch.set_default_device``), as a CUDA type makes CUDA the default on a CUDA build, and its
    dtype the default dtype; a CPU type afterwards sets the device back."""

    def __init__(self, original):
        self.original = original
        self.device_set = False

    def __call__(self, t):
        name = _type_name(t)
        if name is not None and name.startswith(_CUDA):
            self.original("torch." + name[len(_CUDA):])   # its dtype, checked as torch checks it
            torch.set_default_device(virtual_device())
            self.device_set = True
            return
        self.original(t)
        if self.device_set:
            torch.set_default_device(None)
            self.device_set = False
