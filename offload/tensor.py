"""RemoteTensor: a tensor of the virtual device, holding only a handle to a worker's tensor.

It is a wrapper subclass on the real ``moai:0`` device (so autograd and the dispatcher treat it as
a device tensor) that shows user code ``device == cuda:0`` and ``is_cuda``. Its shape, strides and
dtype live in a meta tensor ``_meta`` that ops are inferred on (offload/dispatch.py); views keep
their meta aliasing their base's meta, so in-place ops through a view infer correctly.
"""
from __future__ import annotations

import torch

from offload import session

VISIBLE_DEVICE = torch.device("cuda", 0)


class Handle:
    """The worker-side id of one tensor; freeing the last wrapper frees the remote tensor."""

    __slots__ = ("id",)

    def __init__(self, tid: int):
        self.id = tid

    def __del__(self):
        # Only appends to a list: safe at any point the garbage collector runs.
        session.release_id(self.id)


class RemoteTensor(torch.Tensor):
    _meta: torch.Tensor
    _handle: Handle

    @staticmethod
    def __new__(cls, meta: torch.Tensor, tid: int, requires_grad: bool = False):
        from offload.device import DEVICE

        t = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride(), storage_offset=meta.storage_offset(),
            dtype=meta.dtype, device=DEVICE, requires_grad=requires_grad)
        t._meta = meta
        t._handle = Handle(tid)
        return t

    @property
    def device(self) -> torch.device:
        return VISIBLE_DEVICE

    @property
    def is_cuda(self) -> bool:
        return True

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                        "to copy the tensor to host memory first.")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from offload.dispatch import DISPATCHER

        return DISPATCHER(func, args, kwargs or {})
