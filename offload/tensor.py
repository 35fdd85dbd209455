"""RemoteTensor: a tensor of the virtual device, holding only a handle to a worker's tensor.

It is a wrapper subclass on the real ``moai:0`` device (so autograd and the dispatcher treat it as
a device tensor) that shows user code ``device == cuda:0`` and ``is_cuda``. Its shape, strides and
dtype live in a meta tensor ``_meta`` that ops are inferred on (offload/dispatch.py); views keep
their meta aliasing their base's meta, so in-place ops through a view infer correctly.
"""
from __future__ import annotations

import copy
import re
from typing import Callable

import torch

from daemons.wire import EXT_DETACHED_REF, EXT_LEAF_REF, packed_ref
from offload import backward_failures, session, unsupported
from offload.device import DEVICE
from offload.device_storage import ADDRESSES

VISIBLE_DEVICE = torch.device("cuda", 0)
_TENSOR_DATA = torch._C.TensorBase.data  # the C ``Tensor.data`` descriptor
_make_wrapper_subclass = torch.Tensor._make_wrapper_subclass
_SUFFIX_SEPARATOR = re.compile(r", (?=[a-z_]+=)")  # between torch's repr suffixes: ", dtype=..."
OWN_ATTRIBUTES = frozenset({"_meta", "_handle", "_desc"})   # a RemoteTensor's, in its __dict__


class Handle:
    """The worker-side id of one tensor; freeing the last wrapper frees the remote tensor.
    ``ref`` is the id as op records name it, packed once for all the records using it."""

    __slots__ = ("id", "ref", "__weakref__")

    def __init__(self, tid: int):
        self.id = tid
        self.ref = packed_ref(tid)

    def __del__(self, release=session.release_id):
        # Only appends to a list: safe at any point the garbage collector runs. Bound when defined:
        # a tensor a module imported before this one holds (torch's own registries) dies at exit
        # after this module's globals are gone.
        release(self.id)

    @property
    def plain(self) -> Handle:
        return self


class LeafHandle(Handle):
    """The handle of a parameter whose backward the worker runs (offload/remote_backward.py): the
    same remote tensor, named in records as a leaf of the worker's autograd graph. Its ``plain``
    handle keeps the tensor alive; ``marked_at`` is (thread, autograd sequence number) when it was
    made: graphs that thread recorded before then have no leaf for it on the worker."""

    __slots__ = ("plain", "marked_at")

    def __init__(self, plain: Handle, marked_at: tuple[int, int]):
        self.id, self.plain, self.marked_at = plain.id, plain, marked_at
        self.ref = packed_ref(plain.id, EXT_LEAF_REF)

    def __del__(self):
        pass  # the plain handle frees the remote tensor


class DetachedHandle(Handle):
    """The handle of ``detach()``'s result of a tensor with a graph: the same remote tensor, named
    in records as detached, since the worker's tensor may carry the worker's own autograd graph
    (offload/remote_backward.py). ``base`` keeps the tensor alive."""

    __slots__ = ("base",)

    def __init__(self, base: Handle):
        self.id, self.base = base.id, base
        self.ref = packed_ref(base.id, EXT_DETACHED_REF)

    def __del__(self):
        pass  # the base handle frees the remote tensor


class RemoteTensor(torch.Tensor):
    _meta: torch.Tensor
    _handle: Handle
    _desc: tuple | None = None  # the shape cache's description of _meta (offload/dispatch.py)
    dispatcher: Callable  # offload/dispatch.py's DISPATCHER, set when that module loads

    @staticmethod
    def __new__(cls, meta: torch.Tensor, tid: int | Handle, requires_grad: bool = False):
        """A wrapper of remote tensor ``tid``, or a second wrapper of one through its ``Handle``
        (``detach``: the remote tensor is freed with the last of them)."""
        t = cls._wrap(meta, meta.shape, meta.stride(), meta.storage_offset(), meta.dtype,
                      tid if isinstance(tid, Handle) else Handle(tid), requires_grad)
        if meta.is_conj():
            torch._C._set_conj(t, True)
        if meta.is_neg():
            torch._C._set_neg(t, True)
        return t

    @classmethod
    def described(cls, meta: torch.Tensor, shape: tuple, stride: tuple, offset: int, dtype: torch.dtype,
                  storage: int, tid: int) -> RemoteTensor:
        """``RemoteTensor(meta, tid)`` for a ``meta`` whose metadata the caller already holds (the
        shape cache's), given rather than read back from it, and with the shape cache's
        description (``_desc``; ``storage``: its storage's key) that the next op reading it would
        work out otherwise: the per-op path makes one for nearly every op."""
        t = cls._wrap(meta, shape, stride, offset, dtype, Handle(tid))
        t._desc = ((shape, stride, offset, dtype), storage)
        return t

    @classmethod
    def _wrap(cls, meta: torch.Tensor, shape, stride, offset: int, dtype: torch.dtype, handle: Handle,
              requires_grad: bool = False) -> RemoteTensor:
        t = _make_wrapper_subclass(cls, shape, strides=stride, storage_offset=offset, dtype=dtype,
                                   device=DEVICE, requires_grad=requires_grad)
        t._meta = meta
        t._handle = handle
        return t

    @property
    def device(self) -> torch.device:
        return VISIBLE_DEVICE

    @property
    def is_cuda(self) -> bool:
        return True

    def __format__(self, format_spec):
        # torch.Tensor.__format__ formats a 0-dim tensor's value only when ``type(self) is Tensor``;
        # CUDA tensors do it too (f"{loss:.4f}", and torch's own printing formats element tensors).
        if self.dim() == 0:
            return self.detach().item().__format__(format_spec)
        return object.__format__(self, format_spec)

    def __repr__(self, *, tensor_contents=None):
        # Printed as a CUDA tensor is: "tensor(..., device='cuda:0')" ("Parameter containing:"
        # first for a parameter), where torch would name the subclass ("RemoteTensor(") and read
        # the data element by element (an .item() each, a round trip each here). So the contents
        # are formatted from one downloaded copy, and torch's suffixes (device, dtype, grad_fn ...)
        # are taken from its own repr of this tensor and laid out after "tensor(" as torch does.
        from torch import _tensor_str as ts

        if tensor_contents is None:
            tensor_contents = (ts._tensor_str(self.detach().cpu(), len("tensor(")) if self.numel()
                               else "[]")
        with ts.printoptions(linewidth=1 << 30):  # every suffix on one line, to take them apart
            bare = super().__repr__(tensor_contents="")
        is_param = bare.startswith("Parameter(")
        bare = bare[len("Parameter("):-1] if is_param else bare
        suffixes = _SUFFIX_SEPARATOR.split(bare[len(type(self).__name__) + 1:-1])[1:]
        text = ts._add_suffixes("tensor(" + tensor_contents, suffixes, len("tensor("), False)
        return "Parameter containing:\n" + text if is_param else text

    def __deepcopy__(self, memo):
        # torch's deepcopies the instance dict over the clone's, which would give the copy this
        # tensor's handle: two owners of one remote tensor, the first to die freeing it.
        if not self.is_leaf:
            raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) support "
                               "the deepcopy protocol at the moment.")
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone()
        if self.requires_grad:
            new.requires_grad_()
        memo[id(self)] = new
        if getattr(self, "_is_param", False):
            new._is_param = True
            return new   # nn.Parameter's deepcopy: no gradient, no attributes
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in OWN_ATTRIBUTES},
                                          memo))
        return new

    def detach_(self):
        # Autograd detaches in place without an op reaching the device, but the worker's tensor
        # may carry the worker's own graph (offload/remote_backward.py): from now on it is named
        # detached, as ``detach()``'s result is (truncated backpropagation through time:
        # ``hidden.detach_()`` between steps).
        had_graph = self.requires_grad and not self.is_leaf
        super().detach_()
        if had_graph and type(self._handle) is Handle:
            self._handle = DetachedHandle(self._handle)
        return self

    def untyped_storage(self) -> torch.UntypedStorage:
        return ADDRESSES.storage_of(self._meta)

    def data_ptr(self) -> int:
        # Of the first element, as on CUDA: the storage's address plus the offset in bytes.
        return self.untyped_storage().data_ptr() + self.storage_offset() * self.element_size()

    def is_shared(self) -> bool:
        # Always for a CUDA tensor (other processes open it through IPC handles): torch.multiprocessing
        # and Hogwild-style trainers check it; share_memory_ leaves a device tensor as it is.
        return True

    def tolist(self):
        # torch refuses .tolist() for tensor subclasses; a CUDA tensor's comes from the host copy.
        return self.detach().cpu().tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                        "to copy the tensor to host memory first.")

    # Consumers of these (CuPy, Numba, JAX) would take data_ptr() for an address in GPU memory.
    def __dlpack__(self, *args, **kwargs):
        raise unsupported.not_supported("DLPack export of a cuda:0 tensor (__dlpack__, "
                                        "torch.utils.dlpack.to_dlpack)")

    @property
    def __cuda_array_interface__(self):
        # An AttributeError, as for a CPU tensor: libraries probe it with hasattr.
        raise AttributeError(str(unsupported.not_supported("__cuda_array_interface__ of a cuda:0 tensor")))

    def _set_data(self, new):
        # ``param.data = t`` swaps only the TensorImpl's metadata; the wrapper's meta and remote
        # id must follow, or ``model.half()`` / ``model.to(torch.bfloat16)`` on the device (which
        # Module._apply does through ``.data``) leaves a half parameter naming the float tensor.
        _TENSOR_DATA.__set__(self, new)
        if isinstance(new, RemoteTensor):
            self._meta, self._desc = new._meta, None
            # ``p.data += x`` sets back the same remote tensor, written in place: a parameter named
            # as a leaf (offload/remote_backward.py) stays one.
            if new._handle.id != self._handle.id:
                self._handle = new._handle

    data = property(_TENSOR_DATA.__get__, _set_data)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        try:
            return cls.dispatcher(func, args, kwargs or {})
        except Exception as e:
            if not backward_failures.held(e):
                raise
            return None   # on autograd's device thread: the caller of the backward raises ``e``
