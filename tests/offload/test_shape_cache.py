"""The shape cache of offload/dispatch.py: repeated ops skip the meta kernel, and what it rebuilds
keeps the aliasing and in-place semantics the kernel would have given (checked against CPU)."""
import pytest
import torch

from offload.dispatch import SHAPES

pytestmark = pytest.mark.timeout(120)


def counts():
    return SHAPES.hits, SHAPES.misses


def same(remote, local):
    got = remote.cpu()
    assert got.dtype == local.dtype and got.shape == local.shape
    assert torch.equal(got, local), (got, local)


def test_repeated_op_hits_and_new_metadata_misses(dev):
    a, b = torch.randn(3, 7), torch.randn(7)
    ra, rb = a.to(dev), b.to(dev)
    ra + rb
    hits, misses = counts()
    out = ra + rb
    assert counts() == (hits + 1, misses)
    same(out, a + b)
    ra.t() + torch.randn(3).to(dev)  # other strides: its own entry
    assert SHAPES.misses > misses


def test_scalar_type_and_default_dtype_are_part_of_the_key(dev):
    i = torch.arange(6)
    ri = i.to(dev)
    for _ in range(2):
        same(ri * 2, i * 2)
        same(ri * 2.5, i * 2.5)
        same(ri * True, i * True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        same(ri * 2.5, i * 2.5)
    finally:
        torch.set_default_dtype(previous)


def test_view_after_hit_aliases_its_base(dev):
    a = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    ra = a.to(dev)
    ra[1:3, ::2]
    hits = SHAPES.hits
    view, ref_view = ra[1:3, ::2], a[1:3, ::2]
    assert SHAPES.hits > hits
    assert view._meta.untyped_storage()._cdata == ra._meta.untyped_storage()._cdata
    assert (view.shape, view.stride(), view.storage_offset()) == \
        (ref_view.shape, ref_view.stride(), ref_view.storage_offset())
    view.mul_(10)
    ref_view.mul_(10)
    same(ra, a)
    same(view, ref_view)


@pytest.mark.one_gpu("it subtracts an element of the tensor it writes from it: the CPU kernel reads the element "
                     "as it changes (CUDA leaves such aliasing undefined), split over GPUs it is read once, before")
def test_in_place_through_views_matches_cpu_when_served_from_the_cache(dev):
    a = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    ra = a.to(dev)

    def program(t):
        row = t[2]
        col = t[:, 1]
        row.add_(1)
        col.mul_(3)
        t.transpose(0, 1)[0].sub_(row[0])
        return t.narrow(1, 2, 3).sum(0)

    for _ in range(2):  # the second pass is answered by the cache
        hits = SHAPES.hits
        same(program(ra), program(a))
        same(ra, a)
    assert SHAPES.hits > hits


def test_in_place_result_is_the_input_itself(dev):
    ra = torch.ones(4).to(dev)
    for _ in range(2):
        assert ra.add_(1) is ra
    out = torch.empty(4).to(dev)
    for _ in range(2):
        assert torch.mul(ra, 2, out=out) is out
    same(out, torch.full((4,), 6.0))


def test_foreach_ops_are_cached_per_list(dev):
    params = [torch.randn(3, 4), torch.randn(4)]
    remote = [p.to(dev) for p in params]
    for _ in range(2):
        hits = SHAPES.hits
        torch._foreach_mul_(remote, 0.5)
        torch._foreach_mul_(params, 0.5)
        sums = torch._foreach_add(remote, remote)
        ref = torch._foreach_add(params, params)
    assert SHAPES.hits >= hits + 2
    for r, p, s, q in zip(remote, params, sums, ref):
        same(r, p)
        same(s, q)


def test_multiple_outputs_and_metadata_queries(dev):
    a = torch.randn(5, 3)
    ra = a.to(dev)
    for _ in range(2):
        values, indices = ra.max(dim=0)
        ref_values, ref_indices = a.max(dim=0)
        same(values, ref_values)
        same(indices, ref_indices)
        assert ra.is_same_size(ra)


def test_scalar_values_that_change_every_step_still_hit(dev):
    # AdamW's bias corrections and a scheduled learning rate are new floats every step.
    params = [torch.randn(3, 4), torch.randn(4)]
    remote = [p.to(dev) for p in params]
    torch._foreach_div_(remote, [1.0, 2.0])
    torch._foreach_div_(params, [1.0, 2.0])
    hits, misses = counts()
    for step in range(2, 5):
        values = [1.0 / step, 0.5 + step]
        torch._foreach_div_(remote, values)
        torch._foreach_div_(params, values)
        remote[0].add(remote[0], alpha=0.1 * step)
    assert SHAPES.misses == misses + 1  # only the add's first use
    assert SHAPES.hits >= hits + 5
    for r, p in zip(remote, params):
        same(r, p)
    same(remote[1] * 3, params[1] * 3)
    same(remote[1] * 3.5, params[1] * 3.5)  # the type still is part of the key


def test_arange_is_keyed_by_its_values(dev):
    for end in (5, 9, 5):
        same(torch.arange(2, end, device=dev), torch.arange(2, end))
        same(torch.arange(0.0, end / 2, 0.5, device=dev), torch.arange(0.0, end / 2, 0.5))
