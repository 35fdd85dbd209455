"""``moai::linear`` and ``moai::linear_backward``: a linear layer as one op each way.

On the virtual device ``F.linear`` is a composite: a view, a transpose, a matmul and a view
forward, and about nine ops backward, each a record traced on the front and a kernel launch on
the worker: a third of a small transformer's op stream. The front (offload/linear.py) streams
these two ops instead. This module holds what both sides share: the ops' schemas, and the math,
which a worker runs on its tensors and the front runs on meta tensors to learn the results'
shapes and strides. The math is torch's own: the forward is ``F.linear``, the backward computes
the products autograd computes for it, each result laid out as autograd lays it out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from daemons.worker.kernel import Kernel

FORWARD = "moai::linear"
BACKWARD = "moai::linear_backward"

_library = torch.library.Library("moai", "DEF")
_library.define("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor")
# grad_input, grad_weight, grad_bias; an entry not asked for in output_mask comes back empty.
_library.define("linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask)"
                " -> (Tensor, Tensor, Tensor)")


def forward(input, weight, bias=None):
    return F.linear(input, weight, bias)


def backward(grad_output, input, weight, output_mask):
    grad_2d = grad_output.reshape(-1, grad_output.size(-1))
    nothing = grad_output.new_empty(0)
    grad_input = grad_2d.mm(weight).reshape(input.shape) if output_mask[0] else nothing
    grad_weight = grad_2d.t().mm(input.reshape(-1, input.size(-1))) if output_mask[1] else nothing
    grad_bias = grad_2d.sum(0) if output_mask[2] else nothing
    return grad_input, grad_weight, grad_bias


_library.impl("linear", forward, "Meta")
_library.impl("linear_backward", backward, "Meta")

KERNELS = {FORWARD: Kernel(torch.ops.moai.linear.default, forward),
           BACKWARD: Kernel(torch.ops.moai.linear_backward.default, backward)}
