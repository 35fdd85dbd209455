"""The one clear failure for programs that use CUDA directly instead of through PyTorch ops.

Custom CUDA kernels, CUDA extensions and CUDA libraries loaded with ctypes cannot run on a front
node (it has no GPU) nor be shipped to the workers (they receive PyTorch operators only). Each
entry point of that kind fails at once with this error, naming the API, rather than crashing deep
inside a build or hanging.
"""
from __future__ import annotations

import ctypes
import functools
import inspect

# Shared-library names that only a program talking to CUDA itself would load.
CUDA_LIBRARY_MARKERS = ("libcuda.", "libcudart", "libnvrtc", "libcublas", "libcudnn", "libnccl",
                        "libcufft", "libcurand", "libcusparse", "libcusolver", "libnvToolsExt")


class DirectCudaError(RuntimeError):
    """Raised by every API that would need direct access to a CUDA GPU on the front."""


def not_supported(api: str) -> DirectCudaError:
    return DirectCudaError(
        f"{api} is not supported: the MoAI Platform runs PyTorch operations on a virtual "
        f"accelerator and does not support direct CUDA use (custom CUDA kernels, CUDA extensions "
        f"or CUDA-based third-party libraries). Use a GPU server for this program.")


def _refuse_cuda_sources(original, api):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def build(*args, **kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments
        sources = given.get("sources") or ()
        sources = [sources] if isinstance(sources, str) else list(sources)
        if (given.get("cuda_sources") or given.get("with_cuda")
                or any(str(s).endswith((".cu", ".cuh")) for s in sources)):
            raise not_supported(f"{api} with CUDA sources")
        return original(*args, **kwargs)
    return build


def refusing(api, stands_for=None):
    """A callable that fails with ``not_supported(api)``. In place of a class (``stands_for``), a
    class of its name that fails only when made: type annotations evaluated at import
    (``torch.cuda.CUDAGraph | None`` in transformers), isinstance checks and subclasses work."""
    def refuse(*args, **kwargs):
        raise not_supported(api)
    if isinstance(stands_for, type):
        return type(stands_for.__name__, (), {"__new__": refuse, "__module__": stands_for.__module__,
                                              "__qualname__": stands_for.__qualname__})
    return refuse


def _guard_cuda_libraries(original):
    @functools.wraps(original)
    def __init__(self, name, *args, **kwargs):
        if name and any(marker in str(name) for marker in CUDA_LIBRARY_MARKERS):
            raise not_supported(f"loading {name} with ctypes")
        original(self, name, *args, **kwargs)
    __init__.guards_cuda_libraries = True
    return __init__


def install():
    """Make extension builds with CUDA sources and ctypes loads of CUDA libraries fail clearly."""
    import torch.utils.cpp_extension as cpp_extension
    if getattr(ctypes.CDLL.__init__, "guards_cuda_libraries", False):
        return
    cpp_extension.load = _refuse_cuda_sources(cpp_extension.load, "torch.utils.cpp_extension.load")
    cpp_extension.load_inline = _refuse_cuda_sources(cpp_extension.load_inline,
                                                     "torch.utils.cpp_extension.load_inline")
    cpp_extension.CUDAExtension = refusing("torch.utils.cpp_extension.CUDAExtension")
    ctypes.CDLL.__init__ = _guard_cuda_libraries(ctypes.CDLL.__init__)
