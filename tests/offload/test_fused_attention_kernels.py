"""The worker's kernels for the virtual device's fused attention (daemons/worker/fused_attention.py):
the CPU path (torch's CPU flash attention) and the float32 math path other devices take, both
against autograd through torch's own math attention. Plain functions: no daemons needed."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from daemons.worker import fused_attention

pytestmark = pytest.mark.timeout(60)


def inputs(heads, kv_heads, length, source, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, source, 8, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v)], torch.randn(2, heads, length, 8, generator=g).to(dtype)


def reference(q, k, v, grad, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves, enable_gqa=k.size(1) != q.size(1), **kwargs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


CASES = {
    "causal-gqa": dict(shape=(4, 2, 6, 6), is_causal=True),
    "causal-longer-source": dict(shape=(4, 4, 3, 7), is_causal=True),
    "bool-mask": dict(shape=(4, 4, 5, 5), mask="bool"),
    "float-mask-scale": dict(shape=(4, 2, 5, 6), mask="float", scale=0.2),
}


def case_inputs(case, dtype=torch.float32):
    heads, kv_heads, length, source = case["shape"]
    (q, k, v), grad = inputs(heads, kv_heads, length, source, dtype)
    kwargs = {"is_causal": case.get("is_causal", False), "scale": case.get("scale")}
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(length, source, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[:, 0] = True
    elif case.get("mask") == "float":
        mask = torch.randn(length, source, generator=torch.Generator().manual_seed(3)).to(dtype)
    return (q, k, v), grad, mask, kwargs


def additive(mask, dtype):
    """The mask as the fused op gets it (offload/attention.py turns a bool mask additive)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["cpu-flash", "math"])
def test_forward_and_backward_match_torchs_math_attention(name, path):
    (q, k, v), grad, mask, kwargs = case_inputs(CASES[name])
    expected = reference(q, k, v, grad, attn_mask=mask, **kwargs)
    bias = additive(mask, q.dtype)
    if path == "math":
        out, lse = fused_attention.math_forward(q, k, v, bias, kwargs["is_causal"], kwargs["scale"])
        grads = fused_attention.math_backward(grad, q, k, v, bias, out, lse, kwargs["is_causal"],
                                              kwargs["scale"])
    else:
        result = fused_attention.forward(q, k, v, bias, 0.0, kwargs["is_causal"], scale=kwargs["scale"])
        out, lse = result[0], result[1]
        assert result[4:6] == (q.size(-2), k.size(-2))
        grads = fused_attention.backward(grad, q, k, v, bias, [True, True, True, False], out, lse,
                                         None, None, q.size(-2), k.size(-2), 0.0,
                                         kwargs["is_causal"], result[6], result[7],
                                         scale=kwargs["scale"])[:3]
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    for got, want in zip([out, *grads], expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_math_path_in_bfloat16_accumulates_in_float32():
    (q, k, v), grad, _, _ = case_inputs(CASES["causal-gqa"], torch.bfloat16)
    want = reference(*(t.float() for t in (q, k, v)), grad.float(), is_causal=True)
    out, lse = fused_attention.math_forward(q, k, v, None, True, None)
    grads = fused_attention.math_backward(grad, q, k, v, None, out, lse, True, None)
    for got, expected in zip([out, *grads], want):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_a_row_masked_out_entirely_gives_zeros_not_nan():
    (q, k, v), grad, _, _ = case_inputs(CASES["bool-mask"])
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    out, lse = fused_attention.math_forward(q, k, v, additive(mask, q.dtype), False, None)
    grads = fused_attention.math_backward(grad, q, k, v, additive(mask, q.dtype), out, lse, False, None)
    assert not any(t.isnan().any() for t in (out, *grads))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


def test_dropout_is_refused_not_ignored():
    (q, k, v), _, _, _ = case_inputs(CASES["causal-gqa"])
    with pytest.raises(RuntimeError, match="without dropout"):
        fused_attention.forward(q, k, v, None, 0.1, True)


@pytest.mark.parametrize("layout", ["contiguous", "from-batch-seq-heads", "gqa-from-batch-seq-heads"])
def test_results_have_the_layout_the_front_s_meta_kernel_gives_them(layout):
    """The front infers views of these results from the op's meta kernel (nn.MultiheadAttention
    views the query's gradient at once): the worker's results must be laid out the same way."""
    kv_heads = 2 if layout.startswith("gqa") else 4
    if layout == "contiguous":
        (q, k, v), grad = inputs(4, kv_heads, 5, 5)
    else:   # (batch, seq, heads, dim) transposed to (batch, heads, seq, dim), as attention modules do
        g = torch.Generator().manual_seed(0)
        q, grad = (torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2) for _ in range(2))
        k, v = (torch.randn(2, 5, kv_heads, 8, generator=g).transpose(1, 2) for _ in range(2))
    result = fused_attention.forward(q, k, v)
    metas = [t.to("meta") for t in (q, k, v)]
    expected = torch.ops.aten._scaled_dot_product_fused_attention_overrideable(*metas)
    assert result[0].stride() == expected[0].stride() and result[1].stride() == expected[1].stride()
    grads = fused_attention.backward(grad, q, k, v, None, [True, True, True, False], result[0], result[1],
                                     None, None, 5, 5, 0.0, False, result[6], result[7])
    expected = torch.ops.aten._scaled_dot_product_fused_attention_overrideable_backward(
        grad.to("meta"), *metas, None, [True, True, True, False], expected[0], expected[1], None, None,
        5, 5, 0.0, False, expected[6], expected[7])
    assert [g.stride() for g in grads[:3]] == [e.stride() for e in expected[:3]]
