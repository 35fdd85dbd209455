"""``torch.utils.flop_counter`` for the virtual device's own ops, so that a program's FLOP count
(and the MFU it computes from it) is the one it gets on CUDA.

FlopCounterMode counts only ops it has a formula for: the device's fused linear
(``moai::linear``, offload/linear.py) and the fused attention it calls
(``_scaled_dot_product_fused_attention_overrideable``, offload/attention.py) had none, so a
model's count was 0. The linear's are those of the matmuls torch's composite runs; the
attention's are torch's formulas for CUDA's fused attention kernels.
"""
from __future__ import annotations

import math

import torch
from torch.utils import flop_counter

from daemons.worker import fused_linear  # noqa: F401  (defines the moai:: ops)

aten = torch.ops.aten


def _linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    out_features, in_features = weight_shape
    return 2 * math.prod(input_shape[:-1]) * in_features * out_features


def _linear_backward_flop(grad_output_shape, input_shape, weight_shape, output_mask, *args,
                          out_shape=None, **kwargs) -> int:
    # The gradient of the input and of the weight are one matmul each; the bias's is a sum.
    return _linear_flop(input_shape, weight_shape) * (int(output_mask[0]) + int(output_mask[1]))


def install():
    if torch.ops.moai.linear.default in flop_counter.flop_registry:
        return
    flop_counter.register_flop_formula(torch.ops.moai.linear)(_linear_flop)
    flop_counter.register_flop_formula(torch.ops.moai.linear_backward)(_linear_backward_flop)
    # torch's formulas as registered (their arguments already turned into shapes): get_raw.
    flop_counter.register_flop_formula(aten._scaled_dot_product_fused_attention_overrideable, get_raw=True)(
        flop_counter.sdpa_flop)
    flop_counter.register_flop_formula(aten._scaled_dot_product_fused_attention_overrideable_backward,
                                       get_raw=True)(flop_counter.sdpa_backward_flop)
