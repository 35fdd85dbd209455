"""The fused attention op a front streams for ``F.scaled_dot_product_attention``, run on a worker.

A front's virtual device answers torch's backend choice with OVERRIDEABLE (offload/attention.py),
the backend torch keeps for out-of-tree devices, so one attention is one record each way:
``_scaled_dot_product_fused_attention_overrideable`` and its ``_backward``, instead of the ~20
math ops of the decomposition. No device has a kernel under that name; here it runs as:

- on the CPU, torch's own flash attention for the CPU (what native CPU PyTorch runs, so the
  results are the native ones bit for bit);
- on any other device, the same math written with matmuls in float32: the forward keeps the
  row log-sum-exp, and the backward recomputes the probabilities from it, as flash kernels do.

Grouped-query attention comes as fewer key/value heads than query heads. Dropout never comes here:
the front chooses this op only without it.
"""
from __future__ import annotations

import math

import torch
from torch._meta_registrations import alloc_with_matching_layout   # the meta kernel's own layout

from daemons.worker.kernel import Kernel

aten = torch.ops.aten
FORWARD = "aten::_scaled_dot_product_fused_attention_overrideable"
BACKWARD = "aten::_scaled_dot_product_fused_attention_overrideable_backward"


def forward(query, key, value, attn_bias=None, dropout_p=0.0, is_causal=False,
            return_debug_mask=False, *, scale=None):
    _no_dropout(dropout_p)
    if query.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_bias, scale=scale)
    else:
        out, lse = math_forward(query, key, value, attn_bias, is_causal, scale)
    out = _laid_out(out, lambda: alloc_with_matching_layout(query, tuple(out.shape)))
    lse = lse.contiguous()
    # The schema's other results: no cumulative sequence lengths (dense inputs), the sequence
    # lengths, an unused RNG state (no dropout) and no debug mask.
    seed = torch.empty((), dtype=torch.int64, device=query.device)
    return (out, lse, None, None, query.size(-2), key.size(-2), seed, torch.empty_like(seed), None)


def backward(grad_out, query, key, value, attn_bias, grad_input_mask, out, logsumexp, cum_seq_q,
             cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *,
             scale=None):
    _no_dropout(dropout_p)
    if query.device.type == "cpu":
        grad_q, grad_k, grad_v = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, 0.0, is_causal, attn_mask=attn_bias,
            scale=scale)
    else:
        grad_q, grad_k, grad_v = math_backward(grad_out, query, key, value, attn_bias, out,
                                               logsumexp, is_causal, scale)
    grad_q, grad_k, grad_v = (_laid_out(g, lambda x=x: torch.empty_like(x))
                              for g, x in ((grad_q, query), (grad_k, key), (grad_v, value)))
    # The front never asks for the mask's gradient (a mask that needs one keeps the math path),
    # but the op's schema returns one wherever there is a mask.
    return grad_q, grad_k, grad_v, None if attn_bias is None else torch.zeros_like(attn_bias)


def _laid_out(result, allocate):
    """``result`` in the layout the front's meta kernel gives it (``allocate`` makes one such):
    the front infers the views it takes of it from that layout, and torch's CPU flash kernels
    lay some results out otherwise (grouped heads, inputs transposed from (B, S, H, E) ...)."""
    expected = allocate()
    return result if expected.stride() == result.stride() else expected.copy_(result)


def math_forward(query, key, value, attn_bias, is_causal, scale):
    """(output, row log-sum-exp) of attention, for devices without a kernel used here."""
    scores = _scores(query, key, attn_bias, is_causal, scale)
    lse = torch.logsumexp(scores, -1)
    out = (_probabilities(scores, lse) @ _repeat_heads(value, query).float()).to(query.dtype)
    return out, lse


def math_backward(grad_out, query, key, value, attn_bias, out, logsumexp, is_causal, scale):
    """(grad_query, grad_key, grad_value) from the forward's output and log-sum-exp."""
    scale = _scale(query, scale)
    p = _probabilities(_scores(query, key, attn_bias, is_causal, scale), logsumexp)
    d_out = grad_out.float()
    grad_v = p.transpose(-2, -1) @ d_out
    d_p = d_out @ _repeat_heads(value, query).float().transpose(-2, -1)
    d_s = p * (d_p - (d_out * out.float()).sum(-1, keepdim=True))
    grad_q = (d_s @ _repeat_heads(key, query).float()) * scale
    grad_k = (d_s.transpose(-2, -1) @ query.float()) * scale
    return (grad_q.to(query.dtype), _sum_heads(grad_k, key).to(key.dtype),
            _sum_heads(grad_v, value).to(value.dtype))


KERNELS = {FORWARD: Kernel(aten._scaled_dot_product_fused_attention_overrideable.default, forward),
           BACKWARD: Kernel(aten._scaled_dot_product_fused_attention_overrideable_backward.default,
                            backward)}


def _no_dropout(dropout_p):
    if dropout_p:
        raise RuntimeError("the fused attention of the virtual device runs without dropout; "
                           "the front sends attention with dropout as math ops")


def _scale(query, scale) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(query.size(-1))


def _repeat_heads(kv, query):
    """Key/value heads repeated to the query's (grouped-query attention), as torch's math does."""
    groups = query.size(-3) // kv.size(-3)
    return kv.repeat_interleave(groups, dim=-3) if groups > 1 else kv


def _sum_heads(grad, kv):
    """The gradient of ``_repeat_heads``: each key/value head gets the sum over its group."""
    groups = grad.size(-3) // kv.size(-3)
    if groups == 1:
        return grad
    return grad.unflatten(-3, (kv.size(-3), groups)).sum(-3)


def _scores(query, key, attn_bias, is_causal, scale):
    scores = (query.float() @ _repeat_heads(key, query).float().transpose(-2, -1)) * _scale(query, scale)
    if is_causal:
        length, source = scores.size(-2), scores.size(-1)
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            scores = scores.masked_fill(~attn_bias, float("-inf"))
        else:
            scores = scores + attn_bias.float()
    return scores


def _probabilities(scores, logsumexp):
    # A row masked out entirely has logsumexp -inf: its probabilities are 0, not NaN.
    finite = logsumexp.masked_fill(logsumexp == float("-inf"), 0.0)
    return torch.exp(scores - finite.unsqueeze(-1))
