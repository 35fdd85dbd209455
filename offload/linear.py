"""``F.linear`` on the virtual device: one op forward, one op backward.

torch's linear is a composite: forward a view, a transpose, a matmul and a view; backward about
nine ops more. On a small transformer that is a third of the op stream, and every op is a
record the front traces and a kernel the worker launches. So ``aten::linear`` gets a kernel for
this device's autograd key that streams ``moai::linear`` and, for the gradients,
``moai::linear_backward`` (daemons/worker/fused_linear.py: their schemas and their math, which
is torch's own, so the results are those of the composite).

The composite keeps the cases the fused ops do not cover: an argument that is not a device
tensor (torch's own device check then speaks), and a backward that builds a graph
(``create_graph=True``: the gradient ops must be differentiable themselves).
"""
from __future__ import annotations

import torch

from daemons.worker import fused_linear  # noqa: F401  (defines the moai:: ops and their meta kernels)
from offload.tensor import RemoteTensor

_LINEAR = torch.ops.aten.linear.default
_FUSED = torch.ops.moai.linear.default
_FUSED_BACKWARD = torch.ops.moai.linear_backward.default


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        # Recorded in grad mode, as the program's op was: a worker running the backward itself
        # (offload/remote_backward.py) must record this op in its graph. The node the front's
        # autograd makes for it here is dropped: apply gives the output this Function's.
        with torch.enable_grad():
            return _FUSED(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                  ctx.has_bias and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():
            # create_graph: the gradients must carry their own graph, so torch's differentiable
            # ops compute them (the same math, op by op).
            grads = fused_linear.backward(grad_output, input, weight, wanted)
        else:
            grads = _FUSED_BACKWARD(grad_output, input, weight, wanted)
        return tuple(g if w else None for g, w in zip(grads, wanted))


def linear(input, weight, bias=None):
    if not (isinstance(input, RemoteTensor) and isinstance(weight, RemoteTensor)
            and (bias is None or isinstance(bias, RemoteTensor))):
        return _LINEAR.decompose(input, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        return _Linear.apply(input, weight, bias)
    return _FUSED(input, weight, bias)


def register(library: torch.library.Library):
    library.impl("linear", linear, "AutogradPrivateUse1")
