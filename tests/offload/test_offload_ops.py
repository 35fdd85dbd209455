"""Tensor ops on the virtual device, run by a real worker, against the same ops on plain CPU torch."""
import gc
import re
import subprocess
import sys

import pytest
import torch

from daemons import wire
from offload import session
from tests.offload import batch_size_finder
from worker_fixture import REPO_ROOT, SECRET, clean_env

pytestmark = pytest.mark.timeout(120)


def same(remote, local, **tol):
    got = remote.cpu()
    assert got.dtype == local.dtype and got.shape == local.shape
    if tol:
        torch.testing.assert_close(got, local, **tol)
    else:
        assert torch.equal(got, local), (got, local)


def test_elementwise_and_broadcasting(dev):
    a = torch.randn(4, 5)
    b = torch.randn(5)
    ra, rb = a.to(dev), b.to(dev)
    same(ra + rb * 2 - 1, a + b * 2 - 1)
    same(torch.exp(ra).clamp(max=3.0), torch.exp(a).clamp(max=3.0))
    same(torch.where(ra > 0, ra, rb), torch.where(a > 0, a, b))
    same((ra / 3).to(torch.float64), (a / 3).to(torch.float64))
    same(ra.to(torch.bfloat16) * 2, a.to(torch.bfloat16) * 2)


@pytest.mark.one_gpu("a reduction over a split batch adds in another order: equal within rounding, not bit for bit")
def test_matmul_and_reductions(dev):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    ra, rb = a.to(dev), b.to(dev)
    same(ra @ rb, a @ b)
    same(torch.bmm(ra.view(2, 4, 16), rb.expand(2, 16, 4)), torch.bmm(a.view(2, 4, 16), b.expand(2, 16, 4)))
    same(ra.sum(dim=1), a.sum(dim=1))
    values, indices = ra.max(dim=0)
    ref_values, ref_indices = a.max(dim=0)
    same(values, ref_values)
    same(indices, ref_indices)
    assert ra.mean().item() == a.mean().item()


def test_views_and_in_place_through_views(dev):
    a = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    ra = a.to(dev)
    same(ra.t().contiguous(), a.t().contiguous())
    same(ra.permute(1, 0)[2:5], a.permute(1, 0)[2:5])
    same(ra.view(2, 12).narrow(1, 3, 4).unsqueeze(0), a.view(2, 12).narrow(1, 3, 4).unsqueeze(0))
    view, ref_view = ra[1:3, ::2], a[1:3, ::2]
    view.mul_(10)
    ref_view.mul_(10)
    ra.add_(1)
    a.add_(1)
    ra[0].zero_()
    a[0].zero_()
    same(ra, a)
    same(view, ref_view)


@pytest.mark.one_gpu("the CPU kernel rounds a complex product of a vector's tail otherwise; halves have other tails")
def test_conjugate_and_negative_views_carry_their_bits(dev):
    """``x.conj()`` is a view with the conjugate bit, its ``.imag`` one with the negative bit. A
    device tensor lacked the bits its meta had, so torch's C++ took the wrong branch: ``.imag`` of
    a conjugate view raised, and so did hfft's backward, which resolves one."""
    x, y = torch.randn(6, dtype=torch.complex64), torch.randn(6, dtype=torch.complex64)
    c, rc = x.conj(), x.to(dev).conj()
    assert rc.is_conj() and rc.imag.is_neg() and not rc.resolve_conj().is_conj()
    same(rc.imag * 2, c.imag * 2)
    same(rc.imag.resolve_neg(), c.imag.resolve_neg())
    same(rc.resolve_conj(), c.resolve_conj())
    same(rc * y.to(dev), c * y)
    same(torch.vdot(x.to(dev), y.to(dev)), torch.vdot(x, y))
    same(torch.view_as_real(rc.resolve_conj()), torch.view_as_real(c.resolve_conj()))

    def hfft_gradient(device):
        r = torch.arange(20.0).reshape(4, 5).div(7).to(device).requires_grad_()
        torch.fft.hfft(torch.fft.rfft(r), n=7).pow(2).sum().backward()
        return r.grad

    same(hfft_gradient(dev), hfft_gradient("cpu"), rtol=1e-5, atol=1e-4)


def test_expanded_scalars_come_back_and_go_up(dev):
    """One element seen through strides of 0 (``expand_as`` of a scalar): its download once took
    the worker down, its reply failing to encode."""
    s = torch.tensor(2.5)
    same(s.to(dev).expand(1, 1), s.expand(1, 1))
    same(s.expand(1, 1).to(dev).expand(3, 1), s.expand(3, 1))
    assert torch.ones(2, device=dev).sum().item() == 2.0   # the same worker still serves


def test_indexing(dev):
    a = torch.randn(6, 5)
    idx = torch.tensor([4, 0, 2])
    ra, ridx = a.to(dev), idx.to(dev)
    same(ra[ridx], a[idx])
    same(ra.index_select(1, ridx), a.index_select(1, idx))
    same(torch.gather(ra, 1, ridx.view(1, 3).expand(6, 3)), torch.gather(a, 1, idx.view(1, 3).expand(6, 3)))
    ra[ridx] = 7.0
    a[idx] = 7.0
    same(ra, a)
    parts, ref_parts = ra.split(2), a.split(2)
    assert len(parts) == len(ref_parts)
    for p, r in zip(parts, ref_parts):
        same(p, r)
    same(torch.cat([ra, ra * 2]), torch.cat([a, a * 2]))
    same(torch.stack([ra, ra], dim=1), torch.stack([a, a], dim=1))


def test_data_dependent_shapes(dev):
    a = torch.randn(7, 3)
    ra = a.to(dev)
    same(torch.nonzero(ra > 0), torch.nonzero(a > 0))
    masked, ref = ra[ra > 0.2], a[a > 0.2]
    same(masked, ref)
    same(masked * 2, ref * 2)  # a data-dependent result is an ordinary tensor afterwards
    same(torch.masked_select(ra, ra < 0), torch.masked_select(a, a < 0))
    # repeat_interleave by a tensor of repeats: the result's length is their sum.
    repeats = torch.tensor([2, 0, 1, 3, 1, 0, 2])
    same(ra.repeat_interleave(repeats.to(dev), dim=0), a.repeat_interleave(repeats, dim=0))
    same(torch.repeat_interleave(repeats.to(dev)), torch.repeat_interleave(repeats))
    same(torch.repeat_interleave(ra[:, 0], repeats.to(dev), output_size=9), torch.repeat_interleave(a[:, 0], repeats))


def test_item_cpu_and_copies(dev):
    a = torch.randn(3, 3)
    ra = a.to(dev)
    assert ra.device == torch.device("cuda", 0) and ra.is_cuda
    assert ra[1, 2].item() == a[1, 2].item()
    assert ra.sum().item() == pytest.approx(a.sum().item())
    host = torch.empty(3, 3)
    host.copy_(ra * 3)
    assert torch.equal(host, a * 3)
    rb = torch.zeros(3, 3, device=dev)
    rb.copy_(a.t())  # a non-contiguous upload into an existing tensor
    same(rb, a.t().contiguous())
    rb[0].copy_(torch.tensor(7.0))   # broadcast, as torch's copy_ does
    with pytest.raises(RuntimeError, match=r"^The size of tensor a \(3\) must match the size of tensor b \(2\)"):
        rb.copy_(torch.ones(3, 2))   # refused at the call, as on CUDA (the worker found it at the next sync)
    same(rb, torch.cat([torch.full((1, 3), 7.0), a.t()[1:]]))
    same(torch.full((2, 2), 5, device=dev), torch.full((2, 2), 5))
    same(torch.arange(10, device=dev), torch.arange(10))


def test_cpu_lays_out_as_on_cuda(dev):
    a = torch.randn(4, 6)
    transposed = a.to(dev).t()
    host = transposed.cpu()   # CUDA's .cpu() preserves the strides of a dense tensor
    assert host.stride() == transposed.stride() == (1, 6) and torch.equal(host, a.t())
    assert transposed.to("cpu", memory_format=torch.contiguous_format).is_contiguous()
    assert transposed.to("cpu", torch.float64).stride() == (1, 6)
    # A slice of it (not dense): dense strides in its own order (preserve_format), as CUDA's.
    piece = transposed[:, :3]
    assert piece.cpu().stride() == a.t()[:, :3].clone().stride() == (1, 6)
    assert torch.equal(piece.cpu(), a.t()[:, :3])
    expanded = a[:, :1].to(dev).expand(4, 6)   # overlapping: comes back contiguous, as on CUDA
    assert expanded.cpu().is_contiguous() and torch.equal(expanded.cpu(), a[:, :1].expand(4, 6))


def test_manual_seed_gives_the_cpu_numbers(dev):
    torch.manual_seed(1234)
    remote = [torch.randn(5, device=dev), torch.rand(2, 3, device=dev),
              torch.nn.functional.dropout(torch.ones(10, device=dev), 0.5)]
    torch.manual_seed(1234)
    local = [torch.randn(5), torch.rand(2, 3), torch.nn.functional.dropout(torch.ones(10), 0.5)]
    for r, lo in zip(remote, local):
        same(r, lo)


def test_rng_state_round_trip(dev):
    torch.manual_seed(7)
    state = session.get_rng_state()
    torch.manual_seed(7)
    assert torch.equal(state, torch.get_rng_state())
    first = torch.randn(4, device=dev).cpu()
    session.set_rng_state(state)
    assert torch.equal(torch.randn(4, device=dev).cpu(), first)


@pytest.mark.one_gpu("memory_allocated counts a replicated tensor on each GPU")
def test_freed_tensors_give_their_memory_back(dev):
    gc.collect()
    before = session.memory_stats()["allocated"]
    big = torch.ones(1 << 20, device=dev)  # 4 MiB
    assert session.memory_stats()["allocated"] == before + (4 << 20)
    view = big[10:]
    del big
    gc.collect()
    assert session.memory_stats()["allocated"] == before + (4 << 20)  # the view holds the storage
    del view
    gc.collect()
    stats = session.memory_stats()
    assert stats["allocated"] == before
    assert stats["peak"] >= before + (4 << 20)
    session.reset_peak()
    assert session.memory_stats()["peak"] == before


def test_a_memory_fraction_lowers_the_worker_s_cap_and_bad_ones_are_refused(worker):
    client = wire.Client(worker.address, SECRET, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    try:
        cap = client.call("memory_stats", {})["cap"]
        for bad in (1.5, -0.1, float("nan"), "half", 1):
            with pytest.raises(wire.RemoteError, match="bad_request"):
                client.call("set_memory_fraction", {"fraction": bad})
        assert client.call("set_memory_fraction", {"fraction": 0.25}) == {"cap": cap // 4}
        assert client.call("memory_stats", {})["cap"] == cap // 4
        assert client.call("set_memory_fraction", {"fraction": 1.0}) == {"cap": cap}
    finally:
        client.close()


def test_ids_freed_with_a_batch_are_released_after_its_ops(worker):
    """The stream sends the ids the program dropped with the batch that may still use them."""
    client = wire.Client(worker.address, SECRET, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    try:
        client.send("put", {"id": 1, "tensor": torch.arange(4.0)})
        client.send("run_ops", {"ops": [[1, "aten::mul.Scalar", [wire.RemoteRef(1), 2.0], {}, 2]],
                                "free": [1]})
        assert torch.equal(client.call("fetch", {"id": 2, "seq": 1})["tensor"], torch.arange(4.0) * 2)
        with pytest.raises(wire.RemoteError, match="missing_tensor"):
            client.call("fetch", {"id": 1, "seq": 1})
        assert client.call("memory_stats", {})["allocated"] == 16
        client.send("run_ops", {"ops": [], "free": "all"})
        with pytest.raises(wire.RemoteError, match="bad run_ops message: field .free. must be list"):
            client.call("sync", {"seq": 1})
    finally:
        client.close()


def test_a_program_s_generator_lives_on_the_worker_until_freed(worker):
    """``moai::generator`` makes a generator of the worker's device; records name it by a
    GeneratorRef (draws, seed, state); freed, its id names nothing."""
    client = wire.Client(worker.address, SECRET, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    g = wire.GeneratorRef(5)
    host = torch.Generator().manual_seed(7)
    try:
        client.send("run_ops", {"ops": [
            [0, "moai::get_rng_state", [], {}, 4],
            [1, "moai::generator", [7], {}, 5],
            [2, "aten::randn.generator", [[3]], {"generator": g}, 6],
            [3, "moai::get_rng_state", [g], {}, 7],
            [4, "moai::manual_seed", [7, g], {}, None],
            [5, "aten::randn.generator", [[3]], {"generator": g}, 8],
            [6, "moai::set_rng_state", [wire.RemoteRef(7), g], {}, None],
            [7, "aten::randn.generator", [[3]], {"generator": g}, 9],
            [8, "moai::get_rng_state", [], {}, 10]]})
        first = torch.randn(3, generator=host)
        for tid in (6, 8):
            assert torch.equal(client.call("fetch", {"id": tid, "seq": 8})["tensor"], first)
        assert torch.equal(client.call("fetch", {"id": 9, "seq": 8})["tensor"], torch.randn(3, generator=host))
        default_state = client.call("fetch", {"id": 4, "seq": 8})["tensor"]
        assert torch.equal(client.call("fetch", {"id": 10, "seq": 8})["tensor"], default_state)
        client.send("run_ops", {"ops": [], "free": [5]})
        client.send("run_ops", {"ops": [[9, "aten::randn.generator", [[3]], {"generator": g}, 11]]})
        with pytest.raises(wire.RemoteError, match="generator #5 does not exist on this worker"):
            client.call("sync", {"seq": 9})
    finally:
        client.close()


@pytest.mark.parametrize("record, error", [
    (["torch", "load", ["/etc/passwd"], {}], "torch.load is not a setting a program may change"),
    (["os", "system", ["true"], {}], "os.system is not a setting"),
    (["torch.backends.cudnn", "benchmark", [[True]], {}], "only booleans, integers, strings and nil"),
    (["os.environ", "CUBLAS_WORKSPACE_CONFIG", ["; rm -rf /"], {}], "must look like ':4096:8'"),
    (["torch.backends.cudnn"], "TypeError"),
], ids=["function", "module", "value", "environment", "short"])
def test_a_worker_refuses_settings_it_does_not_know(worker, record, error):
    """``moai::setting`` names torch's settings by strings; anything else is refused, held like a
    failed op, and the stream goes on."""
    client = wire.Client(worker.address, SECRET, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    try:
        client.send("run_ops", {"ops": [[1, "moai::setting", record, {}, None]]})
        with pytest.raises(wire.RemoteError, match=f"setting \\(op #1\\) failed: .*{re.escape(error)}"):
            client.call("sync", {"seq": 1})
        client.send("run_ops", {"ops": [[2, "moai::setting", ["torch.backends.cudnn", "benchmark", [True], {}], {}, None]]})
        client.call("sync", {"seq": 2})
    finally:
        client.close()


def test_a_worker_process_leaves_torch_accelerator_to_the_machine(tmp_path):
    """Records name the device as cuda:0, so the worker claims no device type: torch code asking
    for the accelerator there (optimizers, torch.distributed) finds the machine's own."""
    program = ("import torch, daemons.worker.executor; "
               "print(torch.accelerator.is_available() == torch.cuda.is_available())")
    env = {**clean_env(tmp_path), "MOAI_OFFLOAD": "0"}  # a worker, not a front: no hook
    out = subprocess.run([sys.executable, "-c", program], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "True\n", out.stderr


def test_a_process_importing_the_layer_without_activating_it_keeps_stock_torch(tmp_path):
    """Only activation names the device ``moai`` (with its ``torch.moai`` module): a tool or a
    script importing the layer's modules without activating it still trains on the CPU."""
    program = ("import torch, offload.dispatch\n"
               "p = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.AdamW([p])\n"
               "p.sum().backward(); opt.step()\n"
               "print(torch.accelerator.is_available(), offload.dispatch.DEVICE.type)\n"
               "from offload import activation; activation.activate()\n"
               "print(offload.dispatch.DEVICE)")
    env = {**clean_env(tmp_path), "MOAI_OFFLOAD": "0"}  # no hook: activation is the program's
    out = subprocess.run([sys.executable, "-c", program], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "False privateuseone\nmoai:0\n"


def page_faults(pid: int) -> int:
    """Minor page faults of a process so far (``minflt`` in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_a_cpu_worker_reuses_freed_host_memory_as_a_gpu_caching_allocator_does(worker):
    """Results made, freed and made again come from memory the worker kept: their pages are not
    faulted in again (what fresh host memory costs, and a GPU's caching allocator never pays)."""
    client = wire.Client(worker.address, SECRET, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    try:
        client.call("hello")
        client.send("put", {"id": 1, "tensor": torch.ones(1 << 18)})  # 1 MiB

        def make_and_free(ids) -> int:
            before = page_faults(worker.proc.pid)
            client.send("run_ops", {"ops": [[n, "aten::mul.Tensor", [wire.RemoteRef(1), wire.RemoteRef(1)], {}, tid]
                                            for n, tid in enumerate(ids, 1)]})
            client.call("sync", {"seq": len(ids)})
            client.send("free", {"ids": list(ids)})
            client.call("sync", {"seq": len(ids)})
            return page_faults(worker.proc.pid) - before

        first = make_and_free(range(100, 140))  # 40 results of 1 MiB: 10,240 fresh pages
        again = make_and_free(range(200, 240))
    finally:
        client.close()
    assert first > 5000
    assert again < first / 2, (first, again)  # without keeping them: as many as the first time


def test_out_of_memory_is_the_cuda_error_and_leaves_the_device_intact(dev):
    keep = torch.randn(100).to(dev)
    expected = keep.cpu()
    gc.collect()
    before = session.memory_stats()["allocated"]
    with pytest.raises(torch.OutOfMemoryError, match="out of memory") as info:
        torch.empty(1 << 30, device=dev)  # 4 GiB, past the worker's cap: raised here, as CUDA's
    assert isinstance(info.value, RuntimeError)
    assert len(info.value.args) == 1 and info.value.args[0].startswith("CUDA out of memory. ")  # as tools match it
    half = torch.ones(40 << 20, device=dev)  # 160 MiB: fits
    with pytest.raises(torch.OutOfMemoryError, match="aten::cat"):  # an op's result past the cap
        torch.cat([half, half])  # 320 MiB more
    del half
    gc.collect()
    assert session.memory_stats()["allocated"] == before
    same(keep * 2, expected * 2)


def test_a_program_that_catches_out_of_memory_trains_on_with_a_smaller_batch(dev):
    """accelerate's find_executable_batch_size, fairseq's skipped batches: the program catches the
    OOM of a step and tries again. CUDA raises it at the op that allocates, so the failed step
    changed nothing the program holds (no optimizer state yet). Raised at the next sync, the
    program had gone on past the failure, its AdamW state made of tensors never created: the next
    try failed with a missing tensor. The retry trains exactly as the CPU does."""
    got = batch_size_finder.train(dev, [1 << 16, 64])   # the first: 512 MiB of activations, past the cap
    assert got["size"] == 64
    torch.testing.assert_close(got["losses"], batch_size_finder.train("cpu", [64])["losses"], rtol=1e-5, atol=1e-6)


def test_failed_op_names_the_op_and_the_device_goes_on(dev):
    a = torch.randn(4).to(dev)
    bad = torch.tensor([9]).to(dev)
    with pytest.raises(RuntimeError, match=r"aten::index\.Tensor") as info:
        a[bad].cpu()  # out of range: only the worker, holding the data, can tell
    assert not isinstance(info.value, torch.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="aten::no_such_op"):
        session.current().enqueue("aten::no_such_op", [], {}, None)
        session.synchronize()
    assert (a + 1).sum().item() == pytest.approx(a.cpu().add(1).sum().item())
