"""``F.scaled_dot_product_attention`` on the virtual device: one fused op, not its math.

torch picks an attention backend per device type through a C++ dispatch stub that an out-of-tree
device can fill only from C++; left alone, the virtual device gets the math backend, and one
attention streams as ~30 ops forward and ~15 backward (scores, mask, softmax and their
gradients), each a record traced on the front and a kernel on the worker. So the op itself gets a
kernel for this device's autograd key: where the CPU's flash attention would be chosen for the same
inputs (no dropout, supported dtypes and shapes, flash not disabled with
``torch.nn.attention.sdpa_kernel``), it calls ``_scaled_dot_product_fused_attention_overrideable``,
the op torch keeps for out-of-tree devices. Its backward is one op too (torch's derivative for
it), and the workers run both with their device's fused kernel (daemons/worker/fused_attention.py).
Everything else runs torch's own composite, as before.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from offload.dispatch import meta_form

aten = torch.ops.aten
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_SDPA = aten.scaled_dot_product_attention.default


def _fused(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    if attn_mask is not None and attn_mask.requires_grad:
        return False  # the fused kernels give no gradient for the mask
    # The CPU's chooser reads only metadata and the user's backend switches: the meta tensors
    # answer it as these tensors would on a CPU.
    choice = aten._fused_sdp_choice.default.redispatch(
        _CPU, *meta_form([query, key, value, attn_mask]), dropout_p, is_causal,
        scale=scale, enable_gqa=enable_gqa)
    return choice == SDPBackend.FLASH_ATTENTION.value


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    if not _fused(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return _SDPA.decompose(query, key, value, attn_mask, dropout_p, is_causal,
                               scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # As torch's composite does for its fused backends: True keeps, False is -inf.
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
            attn_mask.logical_not(), float("-inf"))
    return aten._scaled_dot_product_fused_attention_overrideable(
        query, key, value, attn_mask, dropout_p, is_causal, False, scale=scale)[0]


def register(library: torch.library.Library):
    library.impl("scaled_dot_product_attention", scaled_dot_product_attention, "AutogradPrivateUse1")
