"""``torch.autocast("cuda")`` on the virtual device: the ops run in the dtypes real CUDA autocast uses.

torch 2.13 registers no autocast kernels for a PrivateUse1 backend (an op under an enabled
``AutocastPrivateUse1`` key fails with "Could not run ... Autocastmoai"), so this module registers
them: a fallthrough for every op, then casting kernels for the ops of CUDA's autocast policy
(``aten/src/ATen/autocast_mode.cpp``). A kernel casts the device's floating-point arguments and
calls the op again with the autocast key excluded, above autograd, so the casts are differentiated
like CUDA's. Casts of weights are not cached across ops (CUDA caches them; results are the same).
"""
from __future__ import annotations

import functools

import torch
from torch.amp import autocast_mode
from torch.utils._pytree import tree_map

from offload.device_mapping import script_builtin

AUTOCAST_KEY = "AutocastPrivateUse1"

# Ops that run in the autocast dtype (float16 / bfloat16).
LOWER_PRECISION_OPS = (
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "_convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm",
    "mv", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "lstm_cell",
    "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "scaled_dot_product_attention",
)
# Ops that need the range of float32.
FLOAT32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
)
# CUDA's "fp32_set_opt_dtype" ops: an eligible first argument gets ``dtype=float32`` unless the
# caller gave a dtype; the tensors are not cast. (F.cross_entropy calls log_softmax with the
# logits' own dtype, so on CUDA its log-probabilities stay in bfloat16 / float16.)
FLOAT32_SET_OPT_DTYPE_OPS = (
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "sum",
)
# Ops whose floating-point inputs are promoted to the widest of them.
PROMOTE_OPS = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
    "scatter_add", "tensordot", "cat", "stack",
)

_libraries: list[torch.library.Library] = []  # kept alive: a dropped Library unregisters
_original_autocast_init = autocast_mode.autocast.__init__


def _eligible(value) -> bool:
    # CUDA autocast leaves float64 and host tensors alone; device tensors report "cuda" to Python.
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype is not torch.float64 and value.device.type != "cpu")


def _cast_to(dtype):
    return lambda v: v.to(dtype) if _eligible(v) and v.dtype is not dtype else v


def _widest(args, kwargs):
    dtypes = [v.dtype for v in torch.utils._pytree.tree_leaves((args, kwargs)) if _eligible(v)]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else None


def _kernel(op, policy):
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    dtype_at = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

    def run_autocast(*args, **kwargs):
        if policy == "set_opt_dtype":
            if args and _eligible(args[0]) and dtype_at is not None:
                if len(args) > dtype_at:
                    if args[dtype_at] is None:
                        args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*args, **kwargs)
        if policy == "lower":
            dtype = torch.get_autocast_dtype(torch._C._get_privateuse1_backend_name())
        elif policy == "float32":
            dtype = torch.float32
        else:
            dtype = _widest(args, kwargs)
        if dtype is not None:
            args, kwargs = tree_map(_cast_to(dtype), (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)
    return run_autocast


def _register_kernels(library: torch.library.Library):
    for policy, names in (("lower", LOWER_PRECISION_OPS), ("float32", FLOAT32_OPS),
                          ("set_opt_dtype", FLOAT32_SET_OPT_DTYPE_OPS), ("promote", PROMOTE_OPS)):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is None:
                continue
            for overload in packet.overloads():
                op = getattr(packet, overload)
                if overload.startswith("out") or "_out" in overload:
                    continue  # out= variants keep the caller's dtype, as in CUDA autocast
                qualified = name if overload == "default" else f"{name}.{overload}"
                library.impl(qualified, _kernel(op, policy), AUTOCAST_KEY)


def _autocast_init(self, device_type, *args, **kwargs):
    if device_type != "cuda":
        _original_autocast_init(self, device_type, *args, **kwargs)
        return
    _original_autocast_init(self, torch._C._get_privateuse1_backend_name(), *args, **kwargs)
    # As the program named it (code branches on ``ctx.device == "cuda"``); entering and leaving
    # set the state through torch's functions, which read "cuda" as the device (below).
    self.device = "cuda"


def _cuda_state_is_the_device(original, backend: str, legacy_cuda: bool):
    """``torch.is_autocast_enabled("cuda")`` and friends read the virtual device's autocast state,
    which ``autocast("cuda")`` sets here; the argument-less legacy forms mean CUDA too. Libraries
    depend on them: torch.utils.checkpoint replays the autocast state of ``x.device.type`` when it
    recomputes, flash-attention paths pick their dtype with ``get_autocast_dtype("cuda")``."""
    @functools.wraps(original)
    def on_the_device(*args, **kwargs):
        if kwargs.get("device_type") == "cuda":
            kwargs["device_type"] = backend
        elif args and args[0] == "cuda":
            args = (backend, *args[1:])
        elif legacy_cuda and not kwargs and (not args or not isinstance(args[0], str)):
            args = (backend, *args)
        return original(*args, **kwargs)
    return on_the_device


def _gpu_dtype(backend: str, setter: bool):
    # torch.get_autocast_gpu_dtype() / set_autocast_gpu_dtype(dtype): CUDA's, i.e. the device's.
    if setter:
        return lambda dtype: torch.set_autocast_dtype(backend, dtype)
    return lambda: torch.get_autocast_dtype(backend)


def install():
    """Register the kernels and make ``autocast("cuda")`` target the virtual device (idempotent)."""
    if _libraries:
        return
    backend = torch._C._get_privateuse1_backend_name()
    module = getattr(torch, backend)
    if not hasattr(module, "get_amp_supported_dtype"):
        # torch.autocast asks the backend module which dtypes it accepts; CUDA's checks none (a
        # program may autocast to float32 to upcast a low-precision model).
        module.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    every_op = torch.library.Library("_", "IMPL")
    every_op.fallback(torch.library.fallthrough_kernel, dispatch_key=AUTOCAST_KEY)
    aten = torch.library.Library("aten", "IMPL")
    _register_kernels(aten)
    _libraries.extend((every_op, aten))
    autocast_mode.autocast.__init__ = _autocast_init
    for name, legacy_cuda in (("is_autocast_enabled", True), ("set_autocast_enabled", True),
                              ("get_autocast_dtype", False), ("set_autocast_dtype", False)):
        original = getattr(torch, name)
        setattr(torch, name, script_builtin(original, _cuda_state_is_the_device(original, backend, legacy_cuda)))
    torch.get_autocast_gpu_dtype = _gpu_dtype(backend, setter=False)
    torch.set_autocast_gpu_dtype = _gpu_dtype(backend, setter=True)
