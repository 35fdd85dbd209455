"""The virtual device: PyTorch's Python-only PrivateUse1 backend, renamed ``moai``.

Registering it gives the dispatcher a real device type (autograd, device guards and
``torch.library`` kernels work on it) without CUDA in this build. Tensors on it are
``RemoteTensor`` wrappers (offload/tensor.py); user code sees them as ``cuda:0`` because the
wrapper overrides ``device`` and B2's device mapping sends ``"cuda"`` here.

Factory functions (``torch.empty(..., device=dev)``, and every factory built on it: zeros,
randn, arange ...) have no tensor argument for ``__torch_dispatch__`` to catch, so the two
allocation primitives get PrivateUse1 kernels that create a remote tensor; so does the copy
between devices that ``torch.tensor(data, device=...)`` makes with the Python key excluded.

Random numbers: the workers draw from their own generator, like a CUDA device has its own.
``torch.manual_seed(s)`` reaches ``manual_seed_all`` below (torch seeds every registered custom
device), which puts a seed record into the op stream; a worker seeds its generator with ``s``, so a
device random op gives the same numbers as the same op on a native CPU tensor after the same seed.
"""
from __future__ import annotations

import itertools
import types

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

BACKEND = "moai"
# Named by its built-in type, not "moai": PrivateUse1 is renamed only when register() also gives
# it its ``torch.moai`` module. Renamed without one, torch's accelerator checks raise ("Device
# 'moai' does not have a corresponding module"), as CPU ``torch.optim`` does in a process that
# imports this layer without activating it (a tool, a profiling script). A device object names
# its type at each use, so this one reads ``moai:0`` once registered.
DEVICE = torch.device("privateuseone", 0)


class _DeviceGuard(torch._C._acc.DeviceGuard):
    """torch asks the device guard for its device type from ``noexcept`` C++ (``getStream``, each
    time autograd records an op): a Python method there runs bytecode, a signal handler may raise
    KeyboardInterrupt in it, and an exception there terminates the process. This answer is a C
    callable, which runs none (offload/interrupt.py)."""

    type_ = itertools.repeat(torch._C._autograd.DeviceType.PrivateUse1).__next__


_registered = False
_library: torch.library.Library | None = None


def _backend_module() -> types.ModuleType:
    from offload import session

    mod = types.ModuleType(f"torch.{BACKEND}")
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: 0
    mod._is_in_bad_fork = lambda: False
    mod.manual_seed = session.manual_seed
    mod.manual_seed_all = session.manual_seed
    mod.synchronize = lambda device=None: session.synchronize()
    return mod


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    from offload import dispatch

    return dispatch.DISPATCHER.factory(torch.ops.aten.empty.memory_format, (list(size),),
                                       {"dtype": dtype, "device": device, "memory_format": memory_format})


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    from offload import dispatch

    return dispatch.DISPATCHER.factory(torch.ops.aten.empty_strided.default, (list(size), list(stride)),
                                       {"dtype": dtype, "device": device})


# Factories whose composites allocate an empty tensor and resize it in an ``out=`` op (a device
# tensor's shape is fixed at creation), or that have no composite: each streams whole, as one
# allocation the worker makes with the same op.
_WHOLE_FACTORIES = ("arange", "arange.start", "arange.start_step", "eye", "eye.m", "range",
                    "range.step", "tril_indices", "triu_indices", "hann_window",
                    "hann_window.periodic", "hamming_window", "hamming_window.periodic",
                    "hamming_window.periodic_alpha", "hamming_window.periodic_alpha_beta",
                    "bartlett_window", "bartlett_window.periodic", "blackman_window",
                    "blackman_window.periodic", "kaiser_window", "kaiser_window.periodic",
                    "kaiser_window.beta")


def _whole_factory(overload: str):
    packet, _, name = overload.partition(".")
    op = getattr(getattr(torch.ops.aten, packet), name or "default")

    def factory(*args, **kwargs):
        from offload import dispatch

        return dispatch.DISPATCHER.factory(op, args, kwargs)
    return factory


def _efficient_zeros(size, dtype=None, layout=None, device=None, pin_memory=None):
    # Some gradient formulas (sgn's, for one) answer with CUDA's ZeroTensor, zeros that hold no
    # memory; here they are a tensor of zeros, the same values.
    from offload import dispatch

    return dispatch.DISPATCHER.factory(torch.ops.aten.zeros.default, (list(size),),
                                       {"dtype": dtype, "device": device})


def _copy_from(src, dst, non_blocking=False):
    # torch.tensor(data, device=...), as_tensor and new_tensor copy their host tensor to the device
    # with the Python key excluded, past __torch_dispatch__; copy_ then reaches this backend, which
    # hands a copy between devices to _copy_from: the same copy as a program's copy_.
    from offload import dispatch

    return dispatch.copy_(torch.ops.aten.copy_.default, (dst, src, non_blocking), {})


def _local_scalar_dense(t):
    # torch.tensor([loss_a, loss_b]) reads each 0-dim device tensor's value with the Python key
    # excluded too: the same .item() as the program's.
    from offload import dispatch

    return dispatch.local_scalar_dense(torch.ops.aten._local_scalar_dense.default, (t,), {})


def register():
    """Make the ``moai`` device exist in this process (idempotent)."""
    global _registered, _library
    if _registered:
        return
    _setup_privateuseone_for_python_backend(BACKEND, backend_module=_backend_module(),
                                            device_guard=_DeviceGuard())
    _library = torch.library.Library("aten", "IMPL")
    _library.impl("empty.memory_format", _empty, "PrivateUse1")
    _library.impl("empty_strided", _empty_strided, "PrivateUse1")
    _library.impl("_copy_from", _copy_from, "PrivateUse1")
    _library.impl("_local_scalar_dense", _local_scalar_dense, "PrivateUse1")
    _library.impl("_efficientzerotensor", _efficient_zeros, "PrivateUse1")
    for overload in _WHOLE_FACTORIES:
        _library.impl(overload, _whole_factory(overload), "PrivateUse1")
    # They import RemoteTensor, which needs DEVICE.
    from offload import attention, decompositions, higher_order_ops, linear
    attention.register(_library)
    decompositions.register(_library)
    linear.register(_library)
    higher_order_ops.register()
    _take_the_multi_tensor_paths()
    _registered = True


def _take_the_multi_tensor_paths():
    """Optimizers and ``clip_grad_norm_`` default to their ``_foreach_*`` implementations on CUDA,
    but only for tensors whose type is exactly Tensor/Parameter, which a device tensor here is not
    (a parameter of one stays a RemoteTensor). Listing the type makes a program take the path it
    takes on a GPU: a dozen multi-tensor ops per step instead of a dozen ops per parameter, each of
    which the front traces and streams (docs/PERFORMANCE.md)."""
    import importlib

    from offload.tensor import RemoteTensor

    # torch.optim deletes its submodules' names from its namespace: look the modules up by name.
    for module in ("torch.optim.optimizer", "torch.utils._foreach_utils"):
        supported = importlib.import_module(module)._foreach_supported_types
        if RemoteTensor not in supported:
            supported.append(RemoteTensor)
