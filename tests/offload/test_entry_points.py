"""The entry points a single-GPU program uses (issue 3, docs in ../shared/DESIGN.md), on the
virtual device with the layer activated as in a user's process, against plain CPU PyTorch.

In-process tests run on the session's ``dev`` worker (conftest.py) after ``activation.activate()``,
so ``"cuda"`` means the virtual device here exactly as in an unmodified program. Things that need
a process of their own (forked DataLoader workers) run a small front program in a subprocess.
"""
from __future__ import annotations

import copy
import gc
import io
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daemons.loopback_ports import free_port
from worker_fixture import REPO_ROOT, SECRET, clean_env, start_worker

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("activated")]
MEMORY_PER_GPU = "the device's memory figures count a replicated tensor on each of its GPUs"


def same(remote, local, **tol):
    assert remote.is_cuda and remote.device == torch.device("cuda", 0)
    got = remote.detach().cpu()
    assert got.dtype == local.dtype and got.shape == local.shape, (got.dtype, local.dtype)
    if tol:
        torch.testing.assert_close(got, local.detach(), **tol)
    else:
        assert torch.equal(got, local.detach()), (got, local)


FP32 = {"rtol": 1e-5, "atol": 1e-6}


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# --- 1. autocast ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_cuda_runs_matmuls_low_and_losses_in_float32(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    rlin = copy.deepcopy(lin).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = rlin(x.cuda())
        loss = F.cross_entropy(out, y.cuda())
    assert out.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    # CUDA's policy by hand: linear in the low dtype; cross_entropy's log_softmax is given the
    # logits' dtype (so CUDA keeps it low), nll_loss runs in float32; grads come back fp32.
    ref_out = F.linear(x.to(dtype), lin.weight.to(dtype), lin.bias.to(dtype))
    ref_loss = F.nll_loss(F.log_softmax(ref_out, 1, dtype=dtype).float(), y)
    ref_loss.backward()
    same(out, ref_out)
    same(loss, ref_loss, **FP32)
    for p, q in zip(lin.parameters(), rlin.parameters()):
        assert q.grad.dtype == torch.float32
        same(q.grad, p.grad, **FP32)


def test_autocast_cuda_to_float32_is_on_and_upcasts_as_cuda_does():
    """CUDA autocast takes any dtype (nanoGPT runs ``autocast("cuda", dtype=float32)``); CPU's
    refuses float32 with a warning and turns off, which the virtual device did, in its own name."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).to(torch.bfloat16)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    rlin = copy.deepcopy(lin).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cuda", dtype=torch.float32):
            assert torch.is_autocast_enabled("cuda")
            out = rlin(x.cuda())
    same(out, F.linear(x.float(), lin.weight.float(), lin.bias.float()))


def test_autocast_state_queries_and_checkpoint_recomputation():
    x, w = torch.randn(3, 4).cuda(), torch.randn(4, 4).cuda()
    with torch.autocast("cuda"):
        assert (x @ w).dtype == torch.float16  # CUDA's default autocast dtype
    with torch.autocast("cuda", dtype=torch.bfloat16) as ctx:
        assert ctx.device == "cuda"   # as named: code branches on it
        assert torch.is_autocast_enabled() and torch.is_autocast_enabled("cuda")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
        with torch.autocast("cuda", enabled=False):
            assert not torch.is_autocast_enabled("cuda") and (x @ w).dtype == torch.float32
    assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled()
    assert not torch.is_autocast_enabled("cpu")

    # torch.utils.checkpoint recomputes under the autocast state it reads for x.device.type.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).cuda()
    grads = []
    for checkpointed in (False, True):
        block.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            inputs = x.clone().requires_grad_()
            out = (torch.utils.checkpoint.checkpoint(block, inputs, use_reentrant=False)
                   if checkpointed else block(inputs))
            assert out.dtype == torch.bfloat16
            out.float().pow(2).sum().backward()
        grads.append([inputs.grad.cpu()] + [p.grad.cpu() for p in block.parameters()])
    for g, ref in zip(grads[1], grads[0]):
        assert torch.equal(g, ref)


# --- 2. GradScaler -------------------------------------------------------------------------------
def _scaler_run(model, scaler, dev, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    x, y = x.to(dev), y.to(dev)
    losses, scales = [], []
    for step in range(steps):
        opt.zero_grad()
        inputs = x * float("inf") if step == 1 else x  # step 1: inf gradients, the step is skipped
        loss = F.cross_entropy(model(inputs), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales


def _amp_scaler(device):
    return torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=2)


def _cuda_amp_scaler(device):
    if device == "cpu":
        return _amp_scaler("cpu")
    with pytest.warns(FutureWarning, match="deprecated"):
        return torch.cuda.amp.GradScaler(init_scale=2.0 ** 10, growth_interval=2)


@pytest.mark.parametrize("make", [_amp_scaler, _cuda_amp_scaler], ids=["amp", "cuda.amp"])
def test_grad_scaler_matches_the_cpu_and_skips_inf_steps(make):
    local = mlp()
    remote = copy.deepcopy(local).cuda()
    ref_losses, ref_scales = _scaler_run(local, make("cpu"), "cpu", 4)
    scaler = make("cuda")
    assert scaler.is_enabled()
    losses, scales = _scaler_run(remote, scaler, "cuda", 4)
    assert ref_scales == [2.0 ** 10, 2.0 ** 9, 2.0 ** 9, 2.0 ** 10]  # the reference did skip step 1
    assert scales == ref_scales
    torch.testing.assert_close(losses[0::2], ref_losses[0::2], **FP32)
    assert losses[1] != losses[1]  # nan, as on the CPU
    for p, q in zip(local.parameters(), remote.parameters()):
        same(q, p, **FP32)


# --- 3. pin_memory, non_blocking, DataLoader workers ----------------------------------------------
def test_pin_memory_and_non_blocking_copies():
    host = torch.randn(4, 5)
    pinned = host.pin_memory()
    assert torch.equal(pinned, host)
    remote = pinned.to("cuda", non_blocking=True)
    doubled = remote.cuda(non_blocking=True) * 2
    torch.cuda.synchronize()
    same(doubled, host * 2)
    back = doubled.to("cpu", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, host * 2)



def test_a_non_blocking_upload_takes_the_bytes_before_it_returns():
    """A program may refill its host buffer right after ``.to("cuda", non_blocking=True)``: from
    pageable memory (all of the front's; pinning is a no-op) CUDA has read it by then. The message
    read the buffer when it left, so a reused buffer of a few MiB arrived partly refilled."""
    n = 1 << 21   # 8 MiB: zmq sends it from the program's memory, without a copy of its own
    buffer, uploads = torch.empty(n), []
    for i in range(3):
        buffer.fill_(float(i))
        uploads.append(buffer.to("cuda", non_blocking=True))
    target = torch.empty(n, device="cuda")
    target.copy_(buffer, non_blocking=True)
    buffer.fill_(7.0)
    torch.cuda.synchronize()
    for i, up in enumerate(uploads):
        assert up.min().item() == up.max().item() == float(i)
    assert target.min().item() == target.max().item() == 2.0
    large = torch.zeros(80 << 18)   # 80 MiB: sent before the call returns rather than copied
    uploaded = large.to("cuda", non_blocking=True)
    large.fill_(1.0)
    assert uploaded.max().item() == 0.0
    del uploaded


def test_activations_saved_in_pinned_host_memory():
    """``torch.autograd.graph.save_on_cpu(pin_memory=True)`` (activation offloading) allocates its
    host buffers with ``torch.empty(..., pin_memory=torch.cuda.is_available())``: a factory asked
    to pin failed for want of a pinned allocator of the virtual device."""
    model, (x, y) = mlp(), batch()
    remote = copy.deepcopy(model).cuda()
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        loss = F.cross_entropy(remote(x.cuda()), y.cuda())
    loss.backward()
    F.cross_entropy(model(x), y).backward()
    for got, want in zip(remote.parameters(), model.parameters()):
        same(got.grad, want.grad, **FP32)
    assert not torch.empty(2, pin_memory=True).is_pinned()   # a host tensor, as pin_memory() gives


DATALOADER_PROGRAM = textwrap.dedent("""\
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    if sys.argv[1] == "cpu":
        device = "cpu"
    else:
        from offload import activation, session
        activation.activate()
        session.connect([sys.argv[2]], sys.argv[3])
        device = "cuda"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)  # before the fork
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    loader = DataLoader(data, batch_size=8, num_workers=2, pin_memory=True,
                        multiprocessing_context="fork")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print("loss", repr(loss.item()), flush=True)
""")


def test_dataloader_fork_workers_and_pinning_after_the_model_is_on_the_device(tmp_path):
    program = tmp_path / "loader.py"
    program.write_text(DATALOADER_PROGRAM)
    env = clean_env(tmp_path)
    native = subprocess.run([sys.executable, str(program), "cpu"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=REPO_ROOT)
    assert native.returncode == 0, native.stderr[-3000:]
    w = start_worker(tmp_path / "worker")
    try:
        out = subprocess.run([sys.executable, str(program), "cuda", w.address, SECRET],
                             capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    finally:
        w.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    losses = [float(line.split()[1]) for line in out.stdout.splitlines()]
    ref = [float(line.split()[1]) for line in native.stdout.splitlines()]
    assert len(losses) == 6
    torch.testing.assert_close(losses, ref, **FP32)


DDP_PROGRAM = textwrap.dedent("""\
    # A script written for torchrun, launched with one process (torchrun sets these).
    import os
    import sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=sys.argv[2])
    if sys.argv[1] == "cpu":
        device, backend, device_id = "cpu", "gloo", None
    else:
        from offload import activation, session
        activation.activate()
        session.connect([sys.argv[3]], sys.argv[4])
        device, backend = "cuda", "nccl"
        device_id = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend=backend, device_id=device_id)
    print("backends", dist.get_backend(), dist.get_backend(dist.new_group([0])),
          dist.get_backend(dist.new_group([0], backend="gloo")), flush=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)

    def halved(state, bucket):   # a communication hook: it sees, and here changes, every gradient
        work = dist.all_reduce(bucket.buffer().mul_(0.5), async_op=True)
        return work.get_future().then(lambda future: future.value()[0])

    ddp.register_comm_hook(None, halved)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(8, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        print("loss", repr(loss.item()), flush=True)
    probe = nn.Linear(6, 3).to(device)   # a model of its own beside DDP's
    for _ in range(2):
        probe(x).sum().backward()
    if device == "cuda":   # whose backwards the worker runs (offload/remote_backward.py): DDP's stay traced
        print("leaves", type(model[0].weight._handle).__name__, type(probe.weight._handle).__name__, flush=True)
    t = torch.arange(4.0, device=device)
    parts = [torch.zeros(4, device=device)]
    dist.all_gather(parts, t)
    whole = torch.zeros(4, device=device)
    dist.all_gather_into_tensor(whole, t * 2)
    dist.broadcast(t, src=0)
    dist.barrier()
    objects = [None]
    dist.all_gather_object(objects, {"rank": dist.get_rank()})
    print("gathered", parts[0].tolist(), whole.tolist(), t.tolist(), objects, dist.get_world_size(), flush=True)
    # Every other collective of one process, as gloo on the CPU does it.
    new = lambda: torch.zeros(4, device=device)
    out, rows, same = new(), [new()], t.clone()
    collectives = {
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(out, t * 3) or out,
        "reduce_scatter": lambda: dist.reduce_scatter(out, [t * 5]) or out,
        "scatter": lambda: dist.scatter(out, [t + 1], src=0) or out,
        "gather": lambda: dist.gather(t + 2, rows, dst=0) or rows[0],
        "all_to_all_single": lambda: dist.all_to_all_single(out, t + 4) or out,
        "all_to_all": lambda: dist.all_to_all(rows, [t + 6]) or rows[0],
        "reduce": lambda: dist.reduce(same, dst=0) or same,
        "all_gather_coalesced": lambda: dist.all_gather_coalesced([rows], [t + 7]) or rows[0],
        "all_reduce_coalesced": lambda: dist.all_reduce_coalesced([same]) or same,
    }
    for name, run in collectives.items():
        print("collective", name, run().tolist(), flush=True)
    dist.destroy_process_group()
""")


def test_a_torchrun_script_with_one_process_trains_with_ddp_as_on_the_cpu(tmp_path):
    """``dist.init_process_group("nccl")`` and ``DistributedDataParallel`` in a one-process run:
    ``get_backend`` says nccl,
    the collectives of one process, DDP's bucketed gradients through its communication hook (so its
    backward is traced: the reducer's hooks are torch's C++, another model's backward is not), the
    same losses as DDP on the CPU."""
    program = tmp_path / "ddp.py"
    program.write_text(DDP_PROGRAM)
    env = clean_env(tmp_path)
    native = subprocess.run([sys.executable, str(program), "cpu", str(free_port())], capture_output=True,
                            text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert native.returncode == 0, native.stderr[-3000:]
    w = start_worker(tmp_path / "worker")
    try:
        out = subprocess.run([sys.executable, str(program), "cuda", str(free_port()), w.address, SECRET],
                             capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    finally:
        w.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("loss")]
    ref = [float(line.split()[1]) for line in native.stdout.splitlines() if line.startswith("loss")]
    assert len(losses) == 4
    torch.testing.assert_close(losses, ref, **FP32)
    # As on a GPU: code branches on it (a new group without a backend takes the default's).
    assert [line for line in out.stdout.splitlines() if line.startswith("backends")] == ["backends nccl nccl gloo"]
    leaves = [line for line in out.stdout.splitlines() if line.startswith("leaves")]
    assert leaves == ["leaves Handle LeafHandle"]
    gathered = [line for line in out.stdout.splitlines() if line.startswith("gathered")]
    assert gathered == ["gathered [0.0, 1.0, 2.0, 3.0] [0.0, 2.0, 4.0, 6.0] [0.0, 1.0, 2.0, 3.0] [{'rank': 0}] 1"]
    collectives = [line for line in out.stdout.splitlines() if line.startswith("collective")]
    assert len(collectives) == 9
    assert collectives == [line for line in native.stdout.splitlines() if line.startswith("collective")]


EXIT_PROGRAM = textwrap.dedent("""\
    import sys
    import torch
    from offload import activation, session

    activation.activate()
    # Held by a module imported before the layer's: freed at exit after the layer's modules. The
    # generator is seeded before the device's first use, as at the top of a script.
    torch.kept_generator = torch.Generator("cuda").manual_seed(1)
    session.connect([sys.argv[1]], sys.argv[2])
    torch.kept = torch.ones(3, device="cuda")
    drawn = torch.rand(2, generator=torch.kept_generator, device="cuda")
    print("done", torch.kept.sum().item(), torch.equal(drawn.cpu(), torch.rand(2, generator=torch.Generator().manual_seed(1))))
""")


def test_a_generator_seeded_early_and_tensors_alive_at_exit(tmp_path):
    """A device generator seeded before the device's first use draws from that seed; device
    tensors and generators still alive when the interpreter exits go without a word."""
    program = tmp_path / "exit.py"
    program.write_text(EXIT_PROGRAM)
    # The import hook off, so that the layer's modules come after torch, as they do when a program
    # or a library activates it: Python clears modules at exit in the reverse order.
    env = dict(clean_env(tmp_path), MOAI_OFFLOAD="0")
    w = start_worker(tmp_path / "worker")
    try:
        out = subprocess.run([sys.executable, str(program), w.address, SECRET], capture_output=True,
                             text=True, timeout=120, env=env, cwd=REPO_ROOT)
    finally:
        w.stop()
    assert out.returncode == 0 and out.stdout == "done 3.0 True\n", out.stderr[-3000:]
    assert "Exception ignored" not in out.stderr and "Error" not in out.stderr, out.stderr[-3000:]


def test_gradient_formulas_answering_with_zeros_that_hold_no_memory():
    """sgn's gradient is CUDA's ZeroTensor (``_efficientzerotensor``), which the device lacked."""
    grads = []
    for device in ("cpu", "cuda"):
        x = torch.tensor([-1.5, 0.0, 2.0]).to(device).requires_grad_()
        (torch.sgn(x) * x + torch.sgn(x * 3)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0])


BACKWARD_FAILURE_PROGRAM = textwrap.dedent("""\
    import sys
    import torch
    from offload import activation, dispatch, session

    activation.activate()
    session.connect([sys.argv[1]], sys.argv[2])
    run = dispatch.Dispatcher.__call__

    def refusing_cos(self, func, args, kwargs):  # a front op that fails, called by a C++ formula
        if func is torch.ops.aten.cos.default:
            raise NotImplementedError("cos refused here")
        return run(self, func, args, kwargs)

    dispatch.Dispatcher.__call__ = refusing_cos
    x = torch.ones(3, device="cuda", requires_grad=True)
    for attempt in (lambda: torch.sin(x).sum().backward(),
                    lambda: torch.autograd.grad(torch.sin(x * 2).sum(), [x])):
        try:
            attempt()
        except NotImplementedError as e:
            print("raised:", e)
    dispatch.Dispatcher.__call__ = run
    torch.sin(x).sum().backward()
    print("then", x.grad.cpu().tolist() == torch.ones(3).cos().tolist())
""")


def test_a_front_error_inside_a_backward_formula_is_raised_not_a_crash(tmp_path):
    """autograd runs device ops on a thread a Python exception cannot leave on torch 2.13: an op
    of the front failing there ended the process ("terminate called without an active exception",
    torch.fft.hfft's backward did); now backward() and autograd.grad raise it."""
    program = tmp_path / "failure.py"
    program.write_text(BACKWARD_FAILURE_PROGRAM)
    w = start_worker(tmp_path / "worker")
    try:
        out = subprocess.run([sys.executable, str(program), w.address, SECRET], capture_output=True,
                             text=True, timeout=120, env=dict(clean_env(tmp_path), MOAI_OFFLOAD="0"),
                             cwd=REPO_ROOT)
    finally:
        w.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "raised: cos refused here\nraised: cos refused here\nthen True\n", out.stderr[-3000:]


SETTINGS_PROGRAM = textwrap.dedent("""\
    import os
    import sys
    import torch
    from offload import activation, session

    activation.activate()
    # Set before the device's first use, as scripts do at their top.
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    session.connect([sys.argv[1]], sys.argv[2])
    print("plain", torch.empty(3, device="cuda").isnan().all().item())
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    print("deterministic", torch.empty(3, device="cuda").isnan().all().item())   # NaN-filled, as native
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()
""")


def test_the_program_s_device_settings_reach_the_workers(tmp_path):
    """cuDNN autotuning, TF32, deterministic algorithms: each change the program makes is made on
    the workers too, in order with its ops (a CPU worker shows determinism by filling new memory
    with NaN, as native torch does)."""
    program = tmp_path / "settings.py"
    program.write_text(SETTINGS_PROGRAM)
    w = start_worker(tmp_path / "worker")
    try:
        out = subprocess.run([sys.executable, str(program), w.address, SECRET], capture_output=True,
                             text=True, timeout=120, env=clean_env(tmp_path), cwd=REPO_ROOT)
    finally:
        w.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["plain", "False", "deterministic", "True"]
    changes = [line.split("the program set ", 1)[1] for line in w.log.read_text().splitlines()
               if "the program set " in line]
    assert changes == ["torch.backends.cudnn.benchmark = True", "torch.set_float32_matmul_precision('high')",
                       "CUBLAS_WORKSPACE_CONFIG=:4096:8", "torch.use_deterministic_algorithms(True, warn_only=True)",
                       "torch.backends.cuda.matmul.allow_tf32 = False", "torch.use_deterministic_algorithms(False)"]


# --- 4. torch.save / torch.load ------------------------------------------------------------------
def test_save_and_load_tensors_and_state_dicts(tmp_path):
    a = torch.randn(3, 4)
    ra = a.cuda()
    torch.save({"t": ra, "view": ra[1:], "host": a}, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt")
    same(loaded["t"], a)
    same(loaded["view"], a[1:])
    assert loaded["host"].device.type == "cpu"
    for where in ("cuda", torch.device("cuda", 0)):
        same(torch.load(tmp_path / "t.pt", map_location=where)["t"], a)
    for where in ("cpu", {"cuda:0": "cpu"}, lambda storage, loc: storage):
        on_cpu = torch.load(tmp_path / "t.pt", map_location=where)["t"]
        assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, a)
    same(torch.load(tmp_path / "t.pt", map_location=lambda storage, loc: storage.cuda(0))["t"], a)
    torch.save(a, tmp_path / "host.pt")  # a CPU checkpoint loaded onto the device
    same(torch.load(tmp_path / "host.pt", map_location="cuda"), a)

    local = mlp()
    remote = copy.deepcopy(local).cuda()
    torch.save(remote.state_dict(), tmp_path / "sd.pt")
    for where in (None, "cuda", "cpu"):
        state = torch.load(tmp_path / "sd.pt", map_location=where, weights_only=True)
        for (name, ref), (key, got) in zip(local.state_dict().items(), state.items()):
            assert name == key
            if where == "cpu":
                assert got.device.type == "cpu" and torch.equal(got, ref)
            else:
                same(got, ref)
    fresh = mlp(seed=5).cuda()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", map_location="cpu"))
    x, _ = batch()
    same(fresh(x.cuda()), local(x), **FP32)


def test_the_legacy_checkpoint_format_loads_the_saved_numbers(tmp_path):
    """``_use_new_zipfile_serialization=False`` (checkpoints of torch < 1.6 and code that still
    writes them): torch reads their bytes after unpickling, and device tensors were uploaded
    before that, uninitialized."""
    a, model = torch.randn(3, 4), mlp()
    remote = copy.deepcopy(model).cuda()
    torch.save({"t": a.cuda(), "row": a.cuda()[1], "host": a, "state": remote.state_dict()},
               tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(a, tmp_path / "host_legacy.pt", _use_new_zipfile_serialization=False)
    for kwargs in ({}, {"weights_only": True}, {"map_location": "cuda"},
                   {"map_location": lambda storage, loc: storage.cuda()}):
        loaded = torch.load(tmp_path / "legacy.pt", **kwargs)
        same(loaded["t"], a)
        same(loaded["row"], a[1])
        for (name, ref), (key, got) in zip(model.state_dict().items(), loaded["state"].items()):
            assert name == key
            same(got, ref)
    assert torch.equal(torch.load(tmp_path / "legacy.pt", map_location="cpu")["t"], a)
    same(torch.load(tmp_path / "host_legacy.pt", map_location="cuda"), a)


def test_save_a_whole_module_and_load_it_back(tmp_path):
    local = mlp()
    remote = copy.deepcopy(local).cuda()
    torch.save(remote, tmp_path / "model.pt")
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(model, nn.Sequential)
    for p, q in zip(local.parameters(), model.parameters()):
        assert isinstance(q, nn.Parameter) and q.requires_grad
        same(q, p)
    x, y = batch()
    loss = F.cross_entropy(model(x.cuda()), y.cuda())
    loss.backward()
    F.cross_entropy(local(x), y).backward()
    for p, q in zip(local.parameters(), model.parameters()):
        same(q.grad, p.grad, **FP32)
    on_cpu = torch.load(tmp_path / "model.pt", weights_only=False, map_location="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())


def test_deepcopy_of_a_model_on_the_device_owns_its_tensors():
    """An EMA or best-so-far copy, ``copy.deepcopy(model)``: the copy has tensors of its own
    (parameters without gradients, as nn.Parameter copies); changing or deleting it leaves the
    model whole. A plain tensor's copy takes its gradient along."""
    local = mlp()
    remote = copy.deepcopy(local).cuda()
    x, y = batch()
    for model in (local, remote):
        for _ in range(2):   # the second backward names the parameters leaves (remote_backward.py)
            F.cross_entropy(model(x.to(next(model.parameters()).device)), y.to(model[0].weight.device)).backward()
    twin_local, twin = copy.deepcopy(local), copy.deepcopy(remote)
    for p, q in zip(twin_local.parameters(), twin.parameters()):
        assert isinstance(q, nn.Parameter) and q.requires_grad and q.is_cuda
        same(q, p)
        assert p.grad is None and q.grad is None
    leaf = remote[0].weight.detach().clone().requires_grad_()
    leaf.grad = remote[0].weight.grad
    twin_leaf = copy.deepcopy(leaf)
    same(twin_leaf.grad, local[0].weight.grad, **FP32)
    assert twin_leaf.grad._handle.id != leaf.grad._handle.id
    with torch.no_grad():
        for m in (twin_local, twin):
            m[0].weight.mul_(2)
    same(remote[0].weight, local[0].weight)
    same(twin[0].weight, twin_local[0].weight)
    del twin
    gc.collect()
    same(remote(x.cuda()), local(x), **FP32)
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(remote(x.cuda()))


# --- 5. printing, .item(), .tolist(), .numpy() -----------------------------------------------------
def test_device_tensors_are_shared_memory_as_cuda_tensors_are():
    model = nn.Linear(2, 2).cuda().share_memory()
    assert all(p.is_shared() for p in model.parameters())
    assert torch.ones(3, device="cuda").share_memory_().is_shared() and not torch.ones(3).is_shared()


def test_a_tensor_made_of_device_scalars_reads_their_values():
    """``torch.tensor([loss_a, loss_b])`` (metrics gathered step by step) reads each 0-dim device
    tensor's value past __torch_dispatch__: it raised "Could not run aten::_local_scalar_dense"."""
    values = [torch.tensor(1.5), torch.tensor(-2.25), torch.tensor(3)]
    on_device = [v.cuda() for v in values]
    for make in (torch.tensor, torch.as_tensor, torch.Tensor, lambda vs: torch.tensor(vs, dtype=torch.float64),
                 lambda vs: torch.tensor([vs[:2], vs[1:]])):
        expected, got = make(values), make(on_device)
        assert got.device.type == "cpu" and got.dtype == expected.dtype and torch.equal(got, expected)
    same(torch.tensor(on_device, device="cuda"), torch.tensor(values))


def test_print_item_tolist_and_numpy():
    a = torch.tensor([[1.5, -2.0], [3.25, 4.0]])
    ra = a.cuda()
    text = repr(ra)
    assert text == repr(a)[:-1] + ", device='cuda:0')", text  # as CUDA prints it
    assert str(ra) == text
    assert "device='cuda:0'" in repr(ra.to(torch.int64)) and "requires_grad=True" in repr(
        ra.clone().requires_grad_())
    assert ra[1, 0].item() == 3.25
    total = ra.sum()
    assert f"{total:.3f}" == f"{a.sum():.3f}" == "6.750" and "6.7500" in repr(total)
    assert repr(torch.empty(0, 2, device="cuda")) == "tensor([], device='cuda:0', size=(0, 2))"
    torch.manual_seed(0)
    lin = nn.Linear(2, 1)
    assert repr(copy.deepcopy(lin).cuda().bias) == repr(lin.bias).replace(
        ", requires_grad=True)", ", device='cuda:0', requires_grad=True)")
    assert repr(a.to(torch.int32).cuda()) == ("tensor([[ 1, -2],\n        [ 3,  4]], device='cuda:0', "
                                              "dtype=torch.int32)")
    long = torch.arange(3000.0)
    assert repr(long.cuda()) == repr(long)[:-1] + ", device='cuda:0')"  # summarized, one download
    assert ra.tolist() == a.tolist()
    assert ra.to(torch.int32).tolist() == a.to(torch.int32).tolist()
    with pytest.raises(TypeError) as info:
        ra.numpy()
    assert str(info.value) == ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                               "to copy the tensor to host memory first.")
    assert (ra.cpu().numpy() == a.numpy()).all()


# --- 6. every dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                   torch.bool, torch.complex64], ids=str)
def test_dtype_round_trip(dtype):
    g = torch.Generator().manual_seed(3)
    if dtype.is_complex:
        host = torch.complex(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))
    elif dtype.is_floating_point:
        host = torch.randn(3, 4, generator=g).to(dtype)
    elif dtype is torch.bool:
        host = torch.randn(3, 4, generator=g) > 0
    else:
        host = torch.randint(0, 100, (3, 4), generator=g).to(dtype)
    remote = host.cuda()
    assert remote.dtype == dtype
    same(remote, host)
    same(remote.t().contiguous(), host.t().contiguous())


# --- 7. device identity: torch.accelerator and torch.cuda ----------------------------------------
def test_accelerator_and_cuda_queries():
    assert torch.accelerator.is_available()
    assert torch.accelerator.current_accelerator().type == "cuda"
    assert torch.accelerator.current_device_index() == 0
    torch.accelerator.set_device_index(0)
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    torch.cuda.set_device(0)
    with torch.cuda.device(0), torch.cuda.device_of(torch.zeros(1, device="cuda")) as here:
        assert here.idx == 0 and torch.cuda.device_of(torch.zeros(1)).idx == -1
    assert issubclass(torch.cuda.device_of, torch.cuda.device)   # classes, as in torch
    torch.cuda.ipc_collect()   # cleanup code's companion of empty_cache: nothing to collect
    assert torch.cuda.can_device_access_peer(0, 0) is False   # CUDA's answer for a device and itself
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.can_device_access_peer(0, 1)
    assert torch.cuda.get_device_name().startswith("MoAI Accelerator")
    assert torch.cuda.get_device_name(0) == torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    assert props.total_memory > 0 and props.name == torch.cuda.get_device_name()
    # torch 2.13's _CudaDeviceProperties (torch/_C/__init__.pyi; gcnArchName is ROCm's)
    fields = ("name major minor multi_processor_count total_memory is_integrated is_multi_gpu_board "
              "max_threads_per_multi_processor warp_size uuid L2_cache_size clock_rate memory_clock_rate "
              "memory_bus_width shared_memory_per_block shared_memory_per_multiprocessor").split()
    assert all(type(getattr(props, name)) in (int, str, bool) for name in fields)
    assert props.uuid.startswith("GPU-") and props.uuid == torch.cuda.get_device_properties(0).uuid
    major, minor = torch.cuda.get_device_capability()
    assert f"sm_{major}{minor}" in torch.cuda.get_arch_list()   # the build supports its device
    # Telemetry is the master's (test_offload_cluster.py); these workers were started without one.
    with pytest.raises(RuntimeError, match="telemetry comes from the MoAI master"):
        torch.cuda.utilization()
    assert torch.cuda.is_bf16_supported()
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.zeros(1, device="cuda:1")


@pytest.mark.one_gpu(MEMORY_PER_GPU)
def test_device_strings_default_device_and_memory_queries():
    import gc

    with torch.device("cuda"):
        made = torch.ones(2, 3)
        layer = nn.Linear(3, 2)
        assert torch.get_default_device() == torch.device("cuda", 0)
    assert made.is_cuda and layer.weight.is_cuda
    torch.set_default_device("cuda")
    try:
        assert torch.zeros(2).device == torch.device("cuda", 0) == torch.get_default_device()
    finally:
        torch.set_default_device(None)
    assert torch.zeros(2).device.type == "cpu" and torch.get_default_device() == torch.device("cpu")
    on = torch.arange(6, device=torch.device("cuda:0")).view(2, 3)
    same(on.to(made.device, torch.float32) + made, torch.arange(6.0).view(2, 3) + 1)

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    big = torch.empty(1 << 18, device="cuda")  # 1 MiB
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before + (1 << 20)
    assert torch.cuda.max_memory_allocated() >= before + (1 << 20)
    del big
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() == before
    free, total = torch.cuda.mem_get_info()
    assert total == torch.cuda.get_device_properties(0).total_memory and 0 < free <= total


@pytest.mark.one_gpu(MEMORY_PER_GPU)
def test_memory_summary_and_stats_in_the_allocators_layout():
    """``torch.cuda.memory_summary()`` (a common debugging print) and ``memory_stats()`` read the
    caching allocator's statistics; they come in its layout, with the workers' bytes in use."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    big = torch.empty(1 << 18, device="cuda")  # 1 MiB
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    assert stats["allocated_bytes.all.current"] == before + (1 << 20) == torch.cuda.memory_allocated()
    assert stats["reserved_bytes.all.peak"] >= stats["allocated_bytes.all.current"]
    assert stats["num_ooms"] == 0 and stats == torch.accelerator.memory_stats()
    assert torch.cuda.memory_stats_as_nested_dict()["active_bytes"]["all"]["current"] == before + (1 << 20)
    summary = torch.cuda.memory_summary()
    assert "PyTorch CUDA memory summary, device ID 0" in summary and "Allocated memory" in summary
    assert torch.cuda.memory_summary(abbreviated=True).count("from large pool") == 0
    torch.cuda.reset_accumulated_memory_stats()
    assert torch.cuda.get_allocator_backend() == "native"
    del big


@pytest.mark.one_gpu(MEMORY_PER_GPU)
def test_memory_functions_answer_through_every_module_that_holds_them():
    """torch.accelerator.memory's own functions hit an internal assert (no device allocator for
    the virtual device) and its empty_host_cache a segmentation fault; torch.cuda.memory's (which
    torch.cuda.reset_max_memory_cached calls) an AttributeError of a CPU build."""
    import gc

    import torch.accelerator.memory as accelerator_memory

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    big = torch.empty(1 << 18, device="cuda")  # 1 MiB
    torch.cuda.synchronize()
    allocated = before + (1 << 20)
    for module in (torch.cuda, torch.cuda.memory, torch.accelerator, accelerator_memory):
        assert module.memory_allocated() == allocated == module.memory_reserved(), module
        assert module.max_memory_allocated() >= allocated and module.max_memory_reserved() >= allocated
        assert module.memory_stats()["allocated_bytes.all.current"] == allocated
        module.reset_accumulated_memory_stats()
        module.empty_cache()
    assert accelerator_memory.get_memory_info() == torch.cuda.mem_get_info()
    assert torch.cuda.device_memory_used() == allocated
    accelerator_memory.empty_host_cache()
    torch.accelerator.empty_host_cache()
    torch.cuda.reset_peak_host_memory_stats()
    torch.cuda.reset_accumulated_host_memory_stats()
    assert torch.cuda.host_memory_stats() == {}
    del big
    gc.collect()
    with pytest.warns(FutureWarning):
        torch.cuda.reset_max_memory_cached()
    for module in (torch.cuda, torch.cuda.memory, torch.accelerator, accelerator_memory):
        assert module.max_memory_allocated() == before
    assert torch.cuda.random.current_device() == 0 and torch.cuda.graphs.is_current_stream_capturing() is False


def test_cuda_tuning_and_profiling_switches():
    assert torch.cuda.tunable.is_enabled() is False and torch.cuda.tunable.tuning_is_enabled() is False
    torch.cuda.tunable.enable(False)
    for call in (torch.cuda.tunable.enable, lambda: torch.cuda.tunable.set_filename("x.csv"),
                 torch.cuda.graphs.graph_pool_handle, torch.backends.cuda.cublas_workspace_size):
        with pytest.raises(RuntimeError, match="is not supported: the MoAI Platform"):
            call()
    x = torch.randn(4)
    with torch.cuda.profiler.profile():   # an nsys capture range: nothing on the front to capture
        same(x.cuda() * 2, x * 2)


def test_torch_compile_runs_the_model_eagerly_with_a_warning():
    """``model = torch.compile(model)`` (nanoGPT and most recent scripts): the program runs, eagerly."""
    from offload.eager_compile import MESSAGE

    model = mlp()
    remote = copy.deepcopy(model).cuda()
    x, _ = batch()
    with pytest.warns(UserWarning, match="runs the program eagerly"):
        compiled = torch.compile(remote, mode="max-autotune")
    assert compiled is remote
    same(compiled(x.cuda()), model(x), **FP32)

    with pytest.warns(UserWarning, match=MESSAGE[:30]):
        @torch.compile(fullgraph=True)
        def double(t):
            return t * 2
    same(double(x.cuda()), x * 2)
    with pytest.warns(UserWarning):
        remote.compile()
    same(remote(x.cuda()), model(x), **FP32)


@pytest.mark.filterwarnings("ignore")   # they call torch.compile, which runs eagerly here with a warning
def test_control_flow_operators_run_on_device_tensors_as_on_the_cpu():
    """torch.cond, while_loop, scan, associative_scan and map are higher-order ops: each raised "no
    rule registered for HOP ... and subclass RemoteTensor"."""
    from torch._higher_order_ops.associative_scan import associative_scan
    from torch._higher_order_ops.map import map as map_op
    from torch._higher_order_ops.scan import scan
    from torch._higher_order_ops.while_loop import while_loop

    def run(dev):
        torch.manual_seed(0)
        x, w = torch.randn(5, 3).to(dev), torch.randn(3, 3).to(dev)
        return [torch.cond(x.sum() > 0, lambda t, w: (t @ w).sin(), lambda t, w: (t @ w).cos(), (x, w)),
                torch.cond(x.sum() < 0, lambda t, w: (t @ w).sin(), lambda t, w: (t @ w).cos(), (x, w)),
                while_loop(lambda i, t: i < 3, lambda i, t: (i + 1, t * 2 + 1), (torch.tensor(0, device=dev), x))[1],
                *scan(lambda carry, xs: (carry + xs, carry * xs), torch.zeros(3, device=dev), x),
                associative_scan(lambda a, b: a + b, x, 0, combine_mode="generic"),
                map_op(lambda t, y: t * y + 1, x, torch.tensor(2.0, device=dev))]

    for on_device, ref in zip(run("cuda"), run("cpu")):
        same(on_device, ref)
    x = torch.randn(5, 3)
    # CUDA's own combine mode (the CPU has only the generic one); torch returns its leaves as a list
    same(associative_scan(lambda a, b: a * b, x.cuda(), 1)[0], x.cumprod(1), **FP32)


@pytest.mark.filterwarnings("ignore")   # flex_attention warns that it runs uncompiled, as on eager CUDA
def test_flex_attention_with_a_score_mod_and_a_block_mask_trains_as_its_math():
    """A higher-order op: it raised "no rule registered for HOP flex_attention" on device tensors.
    The CPU's flex_attention has no backward, so the reference is the same attention written out."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    positions = torch.arange(16)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = inputs[0] @ inputs[1].transpose(-2, -1) / 8 ** 0.5 + (positions[:, None] - positions[None, :]) * 0.1
    ref = scores.masked_fill(positions[:, None] < positions[None, :], float("-inf")).softmax(-1) @ inputs[2]
    ref.pow(2).sum().backward()

    on_device = [t.cuda().requires_grad_() for t in (q, k, v)]
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 16, 16, device="cuda")
    out = flex_attention(*on_device, score_mod=lambda s, b, h, qi, ki: s + (qi - ki) * 0.1, block_mask=mask)
    out.pow(2).sum().backward()
    same(out, ref, **FP32)
    for t, r in zip(on_device, inputs):
        same(t.grad, r.grad, **FP32)


def test_flop_counter_counts_the_device_linear_and_attention_as_on_cuda():
    """FlopCounterMode (MFU in training scripts) knew none of the device's fused ops: it counted 0."""
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    model = mlp()
    remote = copy.deepcopy(model).cuda()
    x, _ = batch()
    counts = []
    for m, inputs in ((model, x), (remote, x.cuda())):
        with FlopCounterMode(display=False) as counter:
            m(inputs.requires_grad_()).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[1] == counts[0] > 0
    shape = (2, 4, 8, 16)
    q = torch.randn(shape, device="cuda", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    # CUDA's fused attention kernels' formulas (the CPU kernel has none)
    assert counter.get_total_flops() == (flop_counter.sdpa_flop_count(shape, shape, shape)
                                         + flop_counter.sdpa_backward_flop_count(shape, shape, shape, shape))


def test_torch_export_of_a_device_model_is_refused_and_a_cpu_copy_exports():
    """It aborted the process (export fakes the inputs as ``cuda`` tensors, which this torch cannot
    make); natively it exports. The error says how to export: a CPU copy."""
    model = mlp()
    remote = copy.deepcopy(model).cuda()
    x, _ = batch()
    for export in (lambda: torch.export.export(remote, (x.cuda(),)),
                   lambda: torch.export.export(copy.deepcopy(model), (x.cuda(),)),
                   lambda: torch.export.draft_export(remote, (x.cuda(),))):
        with pytest.raises(NotImplementedError, match="cannot be exported .* export a CPU copy instead"):
            export()
    exported = torch.export.export(copy.deepcopy(remote).cpu(), (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    same(remote(x.cuda()), model(x), **FP32)   # the device goes on


def test_sparse_tensors_fail_clearly():
    indices, values = torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0])
    with pytest.raises(NotImplementedError, match=r"sparse_coo tensors are not supported on the virtual cuda:0"):
        torch.sparse_coo_tensor(indices, values, (2, 2)).cuda()
    same(torch.sparse_coo_tensor(indices, values, (2, 2)).to_dense().cuda(), torch.tensor([[0.0, 1.0], [2.0, 0.0]]))


def test_quantizing_on_the_device_fails_at_the_call_and_fake_quantization_runs():
    # The meta kernels describe float results: the tensor said float32 and held qint8 on the
    # worker, and reading it back failed to decode.
    x = torch.randn(6)
    on_device = x.cuda()
    for quantize in (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
                     lambda t: torch.quantize_per_channel(t.view(2, 3), torch.tensor([0.1, 0.2]),
                                                          torch.tensor([0, 0]), 0, torch.quint8),
                     lambda t: torch.quantize_per_tensor_dynamic(t, torch.quint8, False)):
        with pytest.raises(NotImplementedError, match="quantized tensors are not supported on the virtual cuda:0"):
            quantize(on_device)
    same(torch.fake_quantize_per_tensor_affine(on_device, 0.1, 0, -128, 127),
         torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127))


@pytest.mark.parametrize("convert", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr, torch.Tensor.to_mkldnn],
                         ids=["coo", "csr", "mkldnn"])
def test_conversions_to_other_layouts_fail_at_the_call_and_the_device_goes_on(convert):
    # They have no meta kernel: sent to the worker, they failed only at the next sync.
    x = torch.randn(3, 3)
    on_device = x.cuda()
    with pytest.raises(NotImplementedError, match=r"not dense tensors, are not supported on the virtual cuda:0"):
        convert(on_device)
    same(on_device * 2, x * 2)


def test_nested_tensors_fail_clearly():
    parts = [torch.randn(2, 3), torch.randn(4, 3)]
    for make in (lambda: torch.nested.nested_tensor(parts, device="cuda"),
                 lambda: torch.nested.nested_tensor(parts, layout=torch.jagged, device="cuda"),
                 lambda: torch.nested.as_nested_tensor([p.cuda() for p in parts])):
        with pytest.raises(NotImplementedError, match=r"nested tensors are not supported on the virtual cuda:0"):
            make()
    assert torch.nested.nested_tensor(parts).is_nested   # on the CPU as in stock torch


def test_a_host_tensor_given_to_a_device_module_is_worded_as_cuda_words_it():
    # CUDA's check: the first tensor argument (the bias, of addmm) sets the device
    with pytest.raises(RuntimeError, match=r"^Expected all tensors to be on the same device, but found at least "
                                           r"two devices, cuda:0 and cpu! \(when checking argument for argument "
                                           r"mat1 in method aten.addmm.default\)$"):
        nn.Linear(4, 3).cuda()(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"two devices, cpu and cuda:0! \(when checking argument for argument "
                                           r"mat2 in method aten.mm.default\)$"):
        torch.ones(2, 4) @ torch.ones(4, 3, device="cuda")


def test_channels_last_convolutions_are_laid_out_as_on_cuda():
    """torch's meta kernel leaves a convolution's result contiguous, the CPU's and cuDNN's kernels
    return it channels-last: the front and the worker agree on CUDA's layout, forward and backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model = model.to(memory_format=torch.channels_last)
    remote = copy.deepcopy(model).cuda()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last), torch.randint(0, 3, (4,), generator=g)
    out = remote[0](x.cuda())
    assert out.stride() == model[0](x).stride() and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        out.view(4, -1)   # as on CUDA, and at once: the worker's tensor is channels-last too
    same(out.reshape(4, -1), model[0](x).reshape(4, -1), **FP32)
    for m in (model, remote):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(m(x.to(m[0].weight.device)), y.to(m[0].weight.device))
            loss.backward(retain_graph=step == 1)   # step 1's backward traced on the front
            opt.step()
        assert m[0].weight.grad.stride() == m[0].weight.stride()
    for p, q in zip(remote.parameters(), model.parameters()):
        same(p, q, **FP32)
    assert torch.nn.functional.conv2d(x.double().cuda(), model[0].weight.double().cuda()).is_contiguous()


def test_tensor_constructors_with_the_device():
    """``torch.tensor(data, device="cuda")`` and its kin copy with the Python key excluded, past
    ``__torch_dispatch__``: they failed with "Could not run 'aten::_copy_from'" before."""
    import numpy as np

    for make in (lambda d: torch.tensor([1.5, 2.0], device=d), lambda d: torch.tensor([[1, 2], [3, 4]], device=d),
                 lambda d: torch.tensor(3.0, device=d), lambda d: torch.tensor([True, False], device=d),
                 lambda d: torch.tensor([1, 2], dtype=torch.float16, device=d),
                 lambda d: torch.as_tensor([3.0, 4.0], device=d),
                 lambda d: torch.as_tensor(np.arange(4, dtype=np.float32), device=d),
                 lambda d: torch.ones(2, device=d).new_tensor([5.0, 6.0])):
        same(make("cuda"), make("cpu"))
        with torch.inference_mode():
            same(make("cuda"), make("cpu"))
    w = torch.tensor([1.0, 2.0], device="cuda", requires_grad=True)
    assert w.is_leaf and w.requires_grad
    (w * w).sum().backward()
    same(w.grad, torch.tensor([2.0, 4.0]))


def test_inference_mode_runs_the_ops_torch_decomposes_above_autograd():
    """With autograd's keys excluded, ops torch otherwise decomposes before the Python key (item,
    to, linear ...) reach the device whole; they run as their parts."""
    model = mlp()
    remote = copy.deepcopy(model).cuda()
    x, _ = batch()
    with torch.inference_mode():
        out = remote(x.cuda())
        assert out.is_inference()
        same(out, model(x), **FP32)
        assert out.sum().item() == pytest.approx(model(x).sum().item(), rel=1e-5)
        same(out.to(torch.float64), model(x).double(), **FP32)
        assert out.argmax(-1).tolist() == model(x).argmax(-1).tolist()


def test_factories_that_resize_their_output_or_have_no_composite():
    """eye, range, the window functions and stft (through them) resize an ``empty({0})`` in an
    ``out=`` op, which a device tensor cannot; tril/triu_indices had no kernel for the device.
    Each streams whole now."""
    makes = [lambda d: torch.eye(3, device=d), lambda d: torch.eye(2, 3, dtype=torch.float64, device=d),
             lambda d: torch.tril_indices(3, 3, device=d), lambda d: torch.triu_indices(3, 4, 1, device=d),
             lambda d: torch.hann_window(8, device=d), lambda d: torch.hamming_window(8, periodic=False, device=d),
             lambda d: torch.bartlett_window(5, device=d), lambda d: torch.blackman_window(5, device=d),
             lambda d: torch.kaiser_window(6, device=d)]
    for make in makes:
        same(make("cuda"), make("cpu"), **FP32)
    # Magnitudes up to 484, whose last bits depend on the FFT's thread count (a worker computes on
    # one thread): 1.5e-5 apart between one and two threads on an AVX-512 CPU.
    def stft(d):
        return torch.stft(torch.arange(64.0, device=d), 16, window=torch.hann_window(16, device=d),
                          return_complex=True).abs()
    same(stft("cuda"), stft("cpu"), atol=1e-4, rtol=1e-5)


def test_mixing_a_host_tensor_into_a_device_op_fails_as_on_cuda():
    with pytest.raises(RuntimeError, match=r"Expected all tensors to be on the same device, but found at least "
                                           r"two devices, cuda:0 and cpu!"):
        torch.ones(3, device="cuda") + torch.ones(3)
    same(torch.ones(3, device="cuda") + torch.tensor(2.0), torch.full((3,), 3.0))   # a 0-dim host scalar is fine
    # Ops whose meta kernels check no devices ran with the host tensor (sent with every record)
    d, host = torch.ones(2, 3, device="cuda"), torch.ones(3, 2)
    index = torch.tensor([1, 0])
    for op, devices, argument in ((lambda: d @ host, "cuda:0 and cpu", "mat2"),
                                  (lambda: torch.bmm(d[None], host[None]), "cuda:0 and cpu", "mat2"),
                                  (lambda: d.index_select(0, index), "cuda:0 and cpu", "index"),
                                  (lambda: d.gather(1, index[None]), "cuda:0 and cpu", "index"),
                                  (lambda: nn.Embedding(4, 2).cuda()(index), "cuda:0 and cpu", "indices"),
                                  (lambda: nn.Conv1d(2, 1, 1).cuda()(host[None]), "cpu and cuda:0", "weight")):
        with pytest.raises(RuntimeError, match=r"Expected all tensors to be on the same device, but found at "
                                               rf"least two devices, {devices}! .*argument {argument} "):
            op()
    same(d[:, index.cuda()], torch.ones(2, 2))
    same(d[index], torch.ones(2, 3))   # indexing takes host indices, as on CUDA


@pytest.mark.parametrize("inputs_on", ["cuda", "cpu"])
def test_data_parallel_over_the_one_device(inputs_on):
    """``model = nn.DataParallel(model)`` (older scripts do it unconditionally) scatters the batch
    to the one GPU and gathers the gradients back: torch.cuda.comm's primitives, which a CPU
    build lacks."""
    model = mlp()
    remote = nn.DataParallel(copy.deepcopy(model).cuda())
    x, y = batch()
    out = remote(x.to(inputs_on))
    assert out.is_cuda
    F.cross_entropy(out, y.cuda()).backward()
    F.cross_entropy(model(x), y).backward()
    same(out, model(x), **FP32)
    for p, q in zip(remote.module.parameters(), model.parameters()):
        same(p.grad, q.grad, **FP32)


def test_packed_sequences_and_ctc_loss_take_their_lengths_on_the_host():
    """CUDA keeps a PackedSequence's batch sizes, and reads ctc_loss's lengths, on the host:
    ``pack_padded_sequence`` failed ("batch_sizes should always be on CPU") and ctc_loss with
    host lengths mixed devices."""
    from torch.nn.utils import rnn

    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, batch_first=True)
    remote = copy.deepcopy(lstm).cuda()
    g = torch.Generator().manual_seed(2)
    seqs, lengths = torch.randn(3, 6, 4, generator=g), torch.tensor([4, 6, 2])
    outs = []
    for m, device in ((lstm, "cpu"), (remote, "cuda")):
        packed = rnn.pack_padded_sequence(seqs.to(device), lengths, batch_first=True, enforce_sorted=False)
        assert packed.batch_sizes.device.type == "cpu" and packed.data.device.type == device
        out, lens = rnn.pad_packed_sequence(m(packed)[0], batch_first=True, padding_value=-1.0)
        assert lens.device.type == "cpu" and lens.tolist() == [4, 6, 2]
        out.pow(2).sum().backward()
        outs.append(out)
    same(outs[1], outs[0], **FP32)
    for p, q in zip(remote.parameters(), lstm.parameters()):
        same(p.grad, q.grad, **FP32)

    log_probs = torch.randn(7, 3, 5, generator=g).log_softmax(2)
    targets, input_lengths, target_lengths = torch.tensor([[1, 2], [3, 1], [2, 4]]), torch.tensor([7, 6, 5]), torch.tensor([2, 1, 2])
    for reduction in ("mean", "sum"):
        local = log_probs.clone().requires_grad_()
        on_device = log_probs.cuda().requires_grad_()
        expected = F.ctc_loss(local, targets, input_lengths, target_lengths, reduction=reduction)
        got = F.ctc_loss(on_device, targets.cuda(), input_lengths, target_lengths, reduction=reduction)
        expected.backward()
        got.backward()
        same(got, expected, **FP32)
        same(on_device.grad, local.grad, **FP32)
    with torch.inference_mode():
        same(F.ctc_loss(log_probs.cuda(), targets.cuda(), input_lengths, target_lengths),
             F.ctc_loss(log_probs, targets, input_lengths, target_lengths), **FP32)


def test_transformer_encoder_evaluates_with_a_padding_mask():
    """Evaluating an nn.TransformerEncoder with a padding mask under no_grad took torch's fused
    inference path (nested tensors), which failed on the device; the standard path runs."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    remote = copy.deepcopy(encoder).cuda()
    g = torch.Generator().manual_seed(1)
    x, pad = torch.randn(3, 5, 8, generator=g), torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=pad)
        same(remote(x.cuda(), src_key_padding_mask=pad.cuda()), expected, **FP32)
    with torch.inference_mode():
        same(remote(x.cuda(), src_key_padding_mask=pad.cuda()), expected, **FP32)


def test_a_per_process_memory_fraction_caps_the_device():
    assert torch.cuda.get_per_process_memory_fraction() == 1.0
    with pytest.raises(TypeError, match="must be `float`"):
        torch.cuda.set_per_process_memory_fraction(1)
    with pytest.raises(ValueError, match="Allowed range: 0~1"):
        torch.cuda.set_per_process_memory_fraction(1.5)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.synchronize()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (4 << 20)) / total)
    try:
        assert torch.cuda.get_per_process_memory_fraction() < 1.0
        fits = torch.ones(1 << 18, device="cuda")   # 1 MiB of the 4 left
        torch.cuda.synchronize()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.ones(4 << 20, device="cuda")       # 16 MiB
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    same(torch.ones(4 << 20, device="cuda")[:3], torch.ones(3))
    same(fits[:2], torch.ones(2))


# --- 8. AdamW fused / foreach with clip_grad_norm_ -------------------------------------------------
@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
def test_adamw_with_gradient_clipping(options):
    local = mlp()
    remote = copy.deepcopy(local).cuda()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **options)
            for m in (local, remote)]
    x, y = batch()
    norms = ([], [])
    for _ in range(3):
        for k, (model, opt, dev) in enumerate(((local, opts[0], "cpu"), (remote, opts[1], "cuda"))):
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev) * 3), y.to(dev)).backward()
            norms[k].append(nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
            opt.step()
    torch.testing.assert_close(norms[1], norms[0], **FP32)
    assert norms[0][0] > 0.5  # clipping did act
    for p, q in zip(local.parameters(), remote.parameters()):
        same(q, p, **FP32)
    for s, t in zip(opts[0].state.values(), opts[1].state.values()):
        same(t["exp_avg_sq"], s["exp_avg_sq"], **FP32)


# --- 9. scaled_dot_product_attention ---------------------------------------------------------------
@pytest.mark.parametrize("gqa", [False, True], ids=["causal", "gqa"])
def test_scaled_dot_product_attention(gqa):
    g = torch.Generator().manual_seed(4)
    kv_heads = 2 if gqa else 4
    q = torch.randn(2, 4, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, 5, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, 5, 8, generator=g, requires_grad=True)
    rq, rk, rv = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rout = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, enable_gqa=gqa)
    same(rout, out, **FP32)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    rout.backward(grad.cuda())
    for t, r in ((q, rq), (k, rk), (v, rv)):
        same(r.grad, t.grad, **FP32)


@pytest.fixture
def streamed_ops(monkeypatch):
    """The names of the ops the front streams while a test runs."""
    from offload import session

    names: list[str] = []
    current = session.current()
    enqueue = current.enqueue

    def spy(op, *args):
        names.append(op)
        return enqueue(op, *args)

    monkeypatch.setattr(current, "enqueue", spy)
    return names


FUSED = "aten::_scaled_dot_product_fused_attention_overrideable"


def attention_inputs(heads=4, kv_heads=2, seed=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, 6, 8, generator=g).to(dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def attention_on_both(inputs, *, mask=None, **kwargs):
    """(remote output and gradients, CPU output and gradients) of one attention."""
    results = []
    for on_device in (True, False):
        ts = [t.detach().cuda().requires_grad_() if on_device else t for t in inputs]
        m = mask
        if m is not None and on_device:
            m = mask.detach().cuda().requires_grad_(mask.requires_grad)
        out = F.scaled_dot_product_attention(*ts, attn_mask=m, **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(grad.cuda() if on_device else grad)
        results.append([out] + [t.grad for t in ts] + ([m.grad] if m is not None and m.requires_grad else []))
    return results


@pytest.mark.parametrize("make", [lambda: nn.MultiheadAttention(8, 2, batch_first=True),
                                  lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)],
                         ids=["multihead-attention", "transformer-encoder-layer"])
def test_torch_attention_modules_train_as_on_the_cpu(make):
    """torch's own attention modules view the fused attention's gradients at once: the worker's
    kernels must lay them out as the front inferred (daemons/worker/fused_attention.py)."""
    torch.manual_seed(0)
    local = make()
    remote = copy.deepcopy(local).cuda()
    x = torch.randn(2, 4, 8)
    for _ in range(2):   # the second backward runs on the worker (offload/remote_backward.py)
        for model in (local, remote):
            model.zero_grad()
            inputs = x.to(next(model.parameters()).device)
            out = model(inputs, inputs, inputs, need_weights=False)[0] if isinstance(model, nn.MultiheadAttention) \
                else model(inputs)
            out.square().mean().backward()
        for p, q in zip(local.parameters(), remote.parameters()):
            same(q.grad, p.grad, **FP32)


def test_attention_streams_one_fused_op_each_way_with_the_native_results(streamed_ops):
    remote, local = attention_on_both(attention_inputs(), is_causal=True, enable_gqa=True)
    assert streamed_ops.count(FUSED) == 1 and streamed_ops.count(FUSED + "_backward") == 1
    assert not any("softmax" in op or "bmm" in op for op in streamed_ops)
    for r, t in zip(remote, local):
        same(r, t, **FP32)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_masks_take_the_fused_op(kind, streamed_ops):
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(6, 6, generator=g) > 0.3 if kind == "bool" else torch.randn(6, 6, generator=g)
    mask.fill_diagonal_(True if kind == "bool" else 0.0)
    remote, local = attention_on_both(attention_inputs(4, 4), mask=mask)
    assert streamed_ops.count(FUSED) == 1
    for r, t in zip(remote, local):
        same(r, t, **FP32)


def test_attention_in_bfloat16_takes_the_fused_op(streamed_ops):
    inputs = attention_inputs(dtype=torch.bfloat16)
    remote, local = attention_on_both(inputs, is_causal=True, enable_gqa=True)
    assert streamed_ops.count(FUSED) == 1
    for r, t in zip(remote, local):
        same(r, t, rtol=1e-2, atol=1e-2)


def test_attention_under_autocast_runs_fused_in_bfloat16(streamed_ops):
    q, k, v = (t.detach().cuda().requires_grad_() for t in attention_inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16 and streamed_ops.count(FUSED) == 1
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and streamed_ops.count(FUSED + "_backward") == 1
    cq, ck, cv = (t.detach().cpu().to(torch.bfloat16) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(cq, ck, cv, is_causal=True, enable_gqa=True)
    same(out, expected, rtol=1e-2, atol=1e-2)


def test_attention_keeps_the_math_path_where_fused_kernels_do_not_apply(streamed_ops):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # A mask that learns (fused kernels give it no gradient) ...
    mask = torch.randn(6, 6, generator=torch.Generator().manual_seed(9), requires_grad=True)
    remote, local = attention_on_both(attention_inputs(4, 4), mask=mask)
    for r, t in zip(remote, local):
        same(r, t, **FP32)
    # ... the program's own choice of backend ...
    with sdpa_kernel(SDPBackend.MATH):
        remote, local = attention_on_both(attention_inputs(), is_causal=True, enable_gqa=True)
    for r, t in zip(remote, local):
        same(r, t, **FP32)
    # ... and dropout (random: only its shape and its gradient's shape can be compared).
    q, k, v = (t.detach().cuda().requires_grad_() for t in attention_inputs(4, 4))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert FUSED not in streamed_ops and "aten::bmm" in streamed_ops


LINEAR = "moai::linear"


@pytest.mark.parametrize("shape,bias", [((2, 5, 6), True), ((4, 6), False), ((6,), True)],
                         ids=["3d-bias", "2d", "1d-bias"])
def test_linear_streams_one_op_each_way_with_the_native_results(shape, bias, streamed_ops):
    torch.manual_seed(3)
    local = nn.Linear(6, 3, bias=bias)
    remote = copy.deepcopy(local).cuda()
    x = torch.randn(shape, requires_grad=True)
    rx = x.detach().cuda().requires_grad_()
    out, rout = local(x), remote(rx)
    same(rout, out, **FP32)
    grad = torch.randn(out.shape)
    out.backward(grad)
    rout.backward(grad.cuda())
    assert streamed_ops.count(LINEAR) == 1 and streamed_ops.count(LINEAR + "_backward") == 1
    assert "aten::mm" not in streamed_ops and "aten::t" not in streamed_ops
    same(rx.grad, x.grad, **FP32)
    for p, q in zip(local.parameters(), remote.parameters()):
        same(q.grad, p.grad, **FP32)


def test_linear_gradients_only_where_asked_and_without_autograd(streamed_ops):
    torch.manual_seed(4)
    local = nn.Linear(6, 3)
    local.weight.requires_grad_(False)   # a frozen weight, a trained bias and input
    remote = copy.deepcopy(local).cuda()
    x = torch.randn(4, 6, requires_grad=True)
    rx = x.detach().cuda().requires_grad_()
    local(x).sum().backward()
    remote(rx).sum().backward()
    assert remote.weight.grad is None
    same(remote.bias.grad, local.bias.grad, **FP32)
    same(rx.grad, x.grad, **FP32)
    with torch.no_grad():
        same(remote(rx), local(x), **FP32)
    assert streamed_ops.count(LINEAR) == 2


def test_linear_double_backward_matches_native(streamed_ops):
    # create_graph (a gradient penalty): the gradients are built from differentiable ops.
    torch.manual_seed(5)
    local = nn.Linear(6, 3)
    remote = copy.deepcopy(local).cuda()
    x = torch.randn(4, 6, requires_grad=True)
    rx = x.detach().cuda().requires_grad_()
    for model, inp in ((local, x), (remote, rx)):
        loss = model(inp).tanh().sum()
        streamed_ops.clear()
        (g,) = torch.autograd.grad(loss, inp, create_graph=True)
        built_from = list(streamed_ops)
        g.pow(2).sum().backward()
    assert LINEAR + "_backward" not in built_from and "aten::mm" in built_from
    same(rx.grad, x.grad, **FP32)
    for p, q in zip(local.parameters(), remote.parameters()):
        same(q.grad, p.grad, **FP32)


def test_linear_with_an_argument_on_the_host_fails_as_on_cuda():
    remote = nn.Linear(6, 3).cuda()
    with pytest.raises(RuntimeError, match="same device|device"):
        remote(torch.randn(4, 6))


def test_linear_under_autocast_runs_fused_in_bfloat16(streamed_ops):
    remote = nn.Linear(6, 3).cuda()
    rx = torch.randn(4, 6).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = remote(rx)
    assert out.dtype == torch.bfloat16 and streamed_ops.count(LINEAR) == 1
    out.float().sum().backward()
    assert remote.weight.grad.dtype == torch.float32
    expected = F.linear(rx.cpu().bfloat16(), remote.weight.detach().cpu().bfloat16(),
                        remote.bias.detach().cpu().bfloat16())
    same(out, expected, rtol=1e-2, atol=1e-2)


# --- 10. LSTM (and GRU: the same fused-cell path) --------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm-no-bias"])
def test_rnn_forward_and_backward(kind):
    torch.manual_seed(0)
    cls = nn.GRU if kind == "gru" else nn.LSTM
    local = cls(5, 7, num_layers=2, batch_first=True, bias=kind != "lstm-no-bias")
    remote = copy.deepcopy(local).cuda()
    x = torch.randn(3, 4, 5)
    rx = x.cuda().requires_grad_()
    x.requires_grad_()
    out, state = local(x)
    rout, rstate = remote(rx)
    h, rh = (state[0], rstate[0]) if kind != "gru" else (state, rstate)
    same(rout, out, **FP32)
    same(rh, h, **FP32)
    if kind != "gru":
        same(rstate[1], state[1], **FP32)
    (out.sum() + h.pow(2).sum()).backward()
    (rout.sum() + rh.pow(2).sum()).backward()
    same(rx.grad, x.grad, **FP32)
    for (name, p), q in zip(local.named_parameters(), remote.parameters()):
        same(q.grad, p.grad, **FP32)


# --- 11. sampling and the device's generator -------------------------------------------------------
def test_topk_multinomial_and_the_cuda_rng_state():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, generator=g)
    rlogits = logits.cuda()
    values, indices = torch.topk(rlogits, 4, dim=-1)
    ref_values, ref_indices = torch.topk(logits, 4, dim=-1)
    same(values, ref_values)
    same(indices, ref_indices)
    probs = F.softmax(rlogits, dim=-1)

    torch.manual_seed(11)
    first = torch.multinomial(probs, 6, replacement=True)
    assert first.shape == (3, 6) and first.dtype == torch.int64
    drawn = first.cpu()
    assert ((drawn >= 0) & (drawn < 10)).all()
    torch.cuda.manual_seed(11)
    assert torch.equal(torch.multinomial(probs, 6, replacement=True).cpu(), drawn)
    no_repeat = torch.multinomial(probs, 10).cpu()
    assert all(sorted(row) == list(range(10)) for row in no_repeat.tolist())

    state = torch.cuda.random.get_rng_state()
    assert state.dtype == torch.uint8 and state.device.type == "cpu"
    again = torch.multinomial(probs, 6, replacement=True).cpu()
    noise = torch.randn(4, device="cuda").cpu()
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.multinomial(probs, 6, replacement=True).cpu(), again)
    assert torch.equal(torch.randn(4, device="cuda").cpu(), noise)
    torch.cuda.random.set_rng_state(torch.cuda.get_rng_state())


def test_a_generator_of_the_device_draws_apart_from_the_global_stream():
    """``torch.Generator("cuda").manual_seed(s)`` (diffusion pipelines, samplers): its draws are
    its own, reproducible from its seed or state, and leave the default generator alone. A CPU
    worker's generator is the CPU's: the same seed gives the same numbers as on the host."""
    g = torch.Generator(device="cuda").manual_seed(7)
    assert isinstance(g, torch.Generator) and g.device == torch.device("cuda", 0)
    assert g.initial_seed() == 7 and torch.Generator("cuda").initial_seed() == torch.Generator().initial_seed()
    host = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    default_draw = torch.rand(3, device="cuda").cpu()

    torch.manual_seed(0)
    noise = torch.randn(2, 5, generator=g, device="cuda")
    same(noise, torch.randn(2, 5, generator=host))
    filled = torch.empty(4, device="cuda").normal_(generator=g)
    same(filled, torch.empty(4).normal_(generator=host))
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    same(torch.multinomial(probs.cuda(), 4, replacement=True, generator=g),
         torch.multinomial(probs, 4, replacement=True, generator=host))
    same(torch.randperm(6, generator=g, device="cuda"), torch.randperm(6, generator=host))
    same(torch.rand(3, device="cuda"), default_draw)   # the default stream did not move

    state = g.get_state()
    assert state.dtype == torch.uint8 and state.device.type == "cpu"
    assert torch.equal(state, host.get_state())
    after = torch.randint(0, 100, (5,), generator=g, device="cuda").cpu()
    g.set_state(state)
    assert torch.equal(torch.randint(0, 100, (5,), generator=g, device="cuda").cpu(), after)
    g.manual_seed(7)
    same(torch.randn(2, 5, generator=g, device="cuda"), noise.cpu())

    # Seeded before any device use, or never used: the first op still draws from that seed.
    fresh = torch.Generator("cuda")
    fresh.manual_seed(3)
    same(torch.rand(4, generator=fresh, device="cuda"), torch.rand(4, generator=torch.Generator().manual_seed(3)))

    with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
        torch.randn(3, generator=host, device="cuda")


def test_the_workers_free_a_generator_with_the_programs_object(dev):
    from offload import session as sessions

    worker = sessions.current()
    g = torch.Generator("cuda").manual_seed(1)
    torch.rand(2, generator=g, device="cuda")
    torch.cuda.synchronize()
    gc.collect()   # earlier tests' garbage is freed before the generator is watched
    freed = []
    original, worker.release_id = worker.release_id, freed.append
    try:
        generator_id = g._id
        del g
        gc.collect()
    finally:
        worker.release_id = original
    assert freed == [generator_id]


# --- 12. streams and synchronization -------------------------------------------------------------
def test_stream_queries_and_synchronize():
    assert torch.cuda.is_current_stream_capturing() is False
    a = torch.ones(3, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        b = a * 4
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    c = b + 1
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) >= 0
    same(c, torch.full((3,), 5.0))


def test_device_agnostic_streams_and_events():
    """``torch.Event`` / ``torch.Stream`` (torch's names for any accelerator): on the virtual
    device torch's own events could not synchronize, and ``"cuda"`` named a CUDA build's."""
    start, end = torch.Event(enable_timing=True), torch.Event(device="cuda", enable_timing=True)
    start.record()
    c = torch.ones(3, device="cuda") * 5
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0 and end.query()
    same(c, torch.full((3,), 5.0))
    stream = torch.Stream()
    assert stream.device == torch.device("cuda", 0) and stream == torch.Stream("cuda")
    stream.wait_event(end)
    stream.synchronize()
    for obj, kind in ((start, torch.Event), (torch.cuda.Event(), torch.Event), (stream, torch.Stream),
                      (torch.cuda.current_stream(), torch.Stream), (torch.Stream("cpu"), torch.Stream)):
        assert isinstance(obj, kind)


def test_the_default_generator_of_the_device():
    """``torch.cuda.default_generators[0]`` (seeding and state code indexes it) is the generator
    ``torch.cuda.manual_seed`` seeds and ops given none draw from; the tuple was empty."""
    (default,) = torch.cuda.default_generators
    assert isinstance(default, torch.Generator) and default.device == torch.device("cuda", 0)
    default.manual_seed(3)
    assert default.initial_seed() == 3
    same(torch.rand(3, device="cuda"), torch.rand(3, generator=torch.Generator().manual_seed(3)))
    state = default.get_state()
    drawn = torch.rand(4, device="cuda", generator=default)
    default.set_state(state)
    same(torch.rand(4, device="cuda"), drawn.cpu())


# --- 13. autograd hooks and out= ops (views and in-place ops: test_offload_ops.py) ------------------
def test_tensor_and_module_hooks():
    def run(model, dev):
        x, y = batch()
        x = x.to(dev).requires_grad_()
        seen = []
        model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        model[1].register_forward_hook(lambda m, args, out: out + 1)
        model[2].register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].detach().cpu()))
        hidden = model[1](model[0](x))
        hidden.register_hook(lambda grad: grad * 3)
        x.register_hook(lambda grad: grad.clamp(min=0))
        loss = F.cross_entropy(model[2](hidden), y.to(dev))
        loss.backward()
        return loss, x.grad, seen, [p.grad for p in model.parameters()]

    local = mlp()
    ref = run(local, "cpu")
    got = run(copy.deepcopy(mlp()).cuda(), "cuda")
    same(got[0], ref[0], **FP32)
    same(got[1], ref[1], **FP32)
    assert len(got[2]) == len(ref[2]) == 1
    torch.testing.assert_close(got[2][0], ref[2][0], **FP32)
    for g, r in zip(got[3], ref[3]):
        same(g, r, **FP32)


def test_out_variants():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g)
    ra, rb = a.cuda(), b.cuda()
    out, rout = torch.empty(4, 5), torch.empty(4, 5, device="cuda")
    assert torch.mm(ra, rb, out=rout) is rout
    torch.mm(a, b, out=out)
    same(rout, out, **FP32)
    torch.add(ra, 1.5, out=ra)
    torch.add(a, 1.5, out=a)
    same(ra, a)
    values, indices = torch.empty(3, device="cuda"), torch.empty(3, dtype=torch.int64, device="cuda")
    torch.max(ra, 0, out=(values, indices))
    ref = torch.max(a, 0)
    same(values, ref.values)
    same(indices, ref.indices)
    sums = values.new_empty(4)
    assert sums.is_cuda
    torch.sum(ra, 1, out=sums)
    same(sums, a.sum(1), **FP32)
    ref_view, view = a.new_zeros(2, 3), ra.new_zeros(2, 3)
    torch.mul(ra[:2], 2, out=view)  # out= and in-place through a view of a bigger tensor
    torch.mul(a[:2], 2, out=ref_view)
    torch.neg(ra[2:], out=ra[:2])
    torch.neg(a[2:], out=a[:2])
    same(view, ref_view)
    same(ra, a)


# --- more entry points of ordinary programs ------------------------------------------------------
@pytest.mark.parametrize("convert", ["half", "bfloat16", "to"], ids=str)
def test_module_dtype_conversion_on_the_device(convert):
    """Module._apply changes a device parameter's dtype through ``param.data = ...``."""
    local = mlp()
    remote = copy.deepcopy(local).cuda()
    weight = remote[0].weight
    dtype = torch.bfloat16 if convert != "half" else torch.float16
    if convert == "to":
        remote.to("cuda", dtype)
        local.to(dtype)
    else:
        getattr(remote, convert)()
        getattr(local, convert)()
    assert remote[0].weight is weight and weight.dtype == dtype  # the same Parameter, converted
    x, _ = batch()
    same(remote(x.to("cuda", dtype)), local(x.to(dtype)))
    remote.float()
    same(remote[2].bias, local[2].bias.float())


@pytest.mark.parametrize("move", [lambda m: m.cuda(), lambda m: m.to("cuda"), lambda m: m.to("cuda").half()],
                         ids=["cuda", "to-cuda", "to-cuda-then-half"])
def test_moving_a_model_keeps_tied_parameters_tied(move):
    """An embedding shared with the output layer (GPT-2, T5): one parameter, one gradient."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    model.head.weight = model.embed.weight
    remote = move(copy.deepcopy(model))
    assert remote.head.weight is remote.embed.weight and remote.head.weight.is_cuda
    assert len(list(remote.parameters())) == 1
    tokens = torch.tensor([1, 2, 3])
    for m in (model, remote):
        m.head(m.embed(tokens.to(m.embed.weight.device))).float().sum().backward()
    same(remote.embed.weight.grad.float(), model.embed.weight.grad, rtol=1e-2, atol=1e-2)


def test_profiling_with_cuda_activity_records_the_cpu_side_quietly(capfd):
    """``torch.profiler`` asked for CUDA activity (or the older ``use_cuda=True``): one warning
    that the kernels run on the workers, the program's ops in the table, and none of the C++
    warning with a stack trace that this CPU build's fallback printed for every op. Asked for
    CUDA's alone, it failed ("No activities specified")."""
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(8, 8, device="cuda")
    with pytest.warns(UserWarning, match="kernels run on the MoAI workers") as caught:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            with record_function("step"):
                (x @ x).relu_().sum().item()
    assert len([w for w in caught if "MoAI workers" in str(w.message)]) == 1
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    assert "step" in table and "aten::mm" in table
    with pytest.warns(UserWarning, match="MoAI workers"):
        with torch.autograd.profiler.profile(use_cuda=True) as legacy:
            (x * 2).sum().item()
    assert "aten::mul" in legacy.key_averages().table()
    # CUDA's activity alone, on a schedule writing traces (a training loop's profile)
    traces = []
    with pytest.warns(UserWarning, match="MoAI workers"):
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True,
                     schedule=torch.profiler.schedule(wait=0, warmup=1, active=1),
                     on_trace_ready=lambda p: traces.append(p.key_averages().table())) as scheduled:
            for _ in range(2):
                (x + 1).sum().item()
                scheduled.step()
    assert len(traces) == 1 and "aten::add" in traces[0]
    assert "CUDA used in profiler but not enabled" not in capfd.readouterr().err


@pytest.mark.one_gpu("a snapshot has a trace list and segments per GPU")
def test_memory_snapshots_show_the_device_s_live_allocations(tmp_path):
    """``torch.cuda.memory._snapshot()`` / ``_dump_snapshot`` (for pytorch.org/memory_viz) and
    ``memory_snapshot()``: the workers' live allocations in CUDA's layout; recording a history
    warns that none is kept."""
    import pickle

    gc.collect()
    torch.cuda.synchronize()
    with pytest.warns(UserWarning, match="keeps no history of allocations"):
        torch.cuda.memory._record_memory_history(max_entries=1000)
    before = {s["address"] for s in torch.cuda.memory_snapshot()}
    big = torch.zeros(3, 1000, device="cuda")
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    assert snapshot["device_traces"] == [[]]
    new = [s for s in snapshot["segments"] if s["address"] not in before]
    assert [(s["total_size"], s["device"], [b["state"] for b in s["blocks"]]) for s in new] == [
        (12000, 0, ["active_allocated"])]
    assert sum(s["total_size"] for s in snapshot["segments"]) == torch.cuda.memory_allocated()
    torch.cuda.memory._dump_snapshot(str(tmp_path / "snapshot.pickle"))
    dumped = pickle.loads((tmp_path / "snapshot.pickle").read_bytes())
    assert {s["address"] for s in dumped["segments"]} == {s["address"] for s in snapshot["segments"]}
    torch.cuda.memory._record_memory_history(enabled=None)
    del big


def test_sync_debug_mode_reports_the_waits_the_program_did_not_ask_for():
    """``torch.cuda.set_sync_debug_mode("warn")`` finds the hidden syncs of a loop (``.item()``, a
    copy to the host, a data-dependent shape); ops that stream and an explicit synchronize pass."""
    x = torch.randn(6).cuda()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        assert torch.cuda.get_sync_debug_mode() == 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = (x * 2).relu()
            torch.cuda.synchronize()
            assert not caught
            y.sum().item()
            y.cpu()
            x[x > 0]
        assert [str(w.message) for w in caught] == ["called a synchronizing CUDA operation"] * 3
        torch.cuda.set_sync_debug_mode(2)
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            y.max().item()
        with pytest.raises(RuntimeError, match="invalid value of debug_mode"):
            torch.cuda.set_sync_debug_mode("loud")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.get_sync_debug_mode() == 0
    same(y, (x.cpu() * 2).relu())


def test_storages_and_data_pointers_tell_tensors_apart_as_on_cuda():
    """Libraries find shared and tied weights by storage address and size (transformers'
    ``save_pretrained``, safetensors): distinct tensors have distinct storages, a view and a tied
    parameter share their base's, and ``data_ptr()`` counts the view's offset in bytes."""
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10), "out": nn.Linear(4, 4)})
    model.head.weight = model.embed.weight
    model = model.cuda()
    state = model.state_dict()

    def storage_id(t):   # transformers.pytorch_utils.id_tensor_storage, as it reads a CUDA tensor
        return t.device, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()

    groups = {}
    for name, t in state.items():
        groups.setdefault(storage_id(t), []).append(name)
    assert sorted(groups.values()) == sorted([["embed.weight", "head.weight"], ["head.bias"], ["out.weight"],
                                              ["out.bias"]])
    weight = model.out.weight
    assert weight.untyped_storage().device == torch.device("cuda", 0) and weight.storage().is_cuda
    assert weight.untyped_storage().nbytes() == 64 and weight.storage().size() == 16
    assert weight.data_ptr() == weight.untyped_storage().data_ptr() and weight.data_ptr() % 512 == 0
    row = weight[2]
    assert row.untyped_storage() is weight.untyped_storage()
    assert row.data_ptr() == weight.data_ptr() + 2 * 4 * weight.element_size()
    assert weight.detach().data_ptr() == weight.data_ptr() and weight.clone().data_ptr() != weight.data_ptr()
    with pytest.raises(NotImplementedError, match="read them through the tensor"):
        weight.untyped_storage().tolist()
    with pytest.raises(NotImplementedError, match="read them through the tensor"):
        torch.save(weight.untyped_storage(), io.BytesIO())   # recursed without end before


def test_gpu_memory_is_not_handed_to_other_libraries():
    """CuPy, Numba and JAX take a CUDA tensor's memory through DLPack or the CUDA array
    interface; they would read the device storage's address as GPU memory."""
    x = torch.ones(3, device="cuda")
    for export in (x.__dlpack__, lambda: torch.utils.dlpack.to_dlpack(x), lambda: torch.to_dlpack(x)):
        with pytest.raises(RuntimeError, match=r"^DLPack export of a cuda:0 tensor .* is not supported"):
            export()
    assert not hasattr(x, "__cuda_array_interface__")   # what libraries probe; a CPU tensor's answer
    with pytest.raises(AttributeError, match="__cuda_array_interface__ of a cuda:0 tensor is not supported"):
        x.__cuda_array_interface__
    same(torch.from_dlpack(torch.utils.dlpack.to_dlpack(torch.arange(3.0))).cuda(), torch.arange(3.0))


def test_legacy_cuda_tensor_types():
    """``Tensor = torch.cuda.FloatTensor if cuda else torch.FloatTensor`` (older GAN and RL code):
    the types make device tensors, device tensors are of them, and ``type()`` names them."""
    Tensor, LongTensor = torch.cuda.FloatTensor, torch.cuda.LongTensor
    valid = Tensor(3, 1).fill_(1.0)
    same(valid, torch.ones(3, 1))
    same(LongTensor([1, 2]), torch.tensor([1, 2]))
    same(Tensor(torch.Size([2])).zero_(), torch.zeros(2))
    same(Tensor(np.arange(3.0)), torch.arange(3.0))
    assert isinstance(valid, torch.cuda.FloatTensor) and isinstance(valid, Tensor)
    assert not isinstance(valid, LongTensor) and not isinstance(torch.ones(1), Tensor)
    assert valid.type() == "torch.cuda.FloatTensor" and torch.typename(valid) == "torch.cuda.FloatTensor"
    assert valid.long().type() == "torch.cuda.LongTensor" and torch.ones(1).type() == "torch.FloatTensor"

    same(torch.tensor([1.5, 2.5]).type(LongTensor), torch.tensor([1, 2]))
    same(valid.type("torch.cuda.HalfTensor"), torch.ones(3, 1, dtype=torch.half))
    assert valid.type(Tensor) is valid
    assert torch.equal(valid.type(torch.FloatTensor), torch.ones(3, 1))   # to the host, as on CUDA

    dtype = torch.get_default_dtype()
    try:
        torch.set_default_tensor_type(torch.cuda.DoubleTensor)
        made = torch.zeros(2)
        assert made.is_cuda and made.dtype == torch.float64
        torch.set_default_tensor_type("torch.FloatTensor")
        made = torch.zeros(2)
        assert made.device.type == "cpu" and made.dtype == torch.float32
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(dtype)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.05)], ids=["sgd", "adamw"])
def test_moving_a_model_keeps_its_parameter_objects(make):
    """CUDA's move swaps the parameters' data in place, so what a program took before
    ``model.cuda()`` names the moved parameters: an optimizer, a list kept for
    ``clip_grad_norm_``, hooks, attributes. Before, the move made new parameters: such a list
    clipped the host copies (a norm of 0, nothing clipped) and the hooks never ran."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10)})
    model.head.weight = model.embed.weight
    runs = []
    for m, device in ((copy.deepcopy(model), "cpu"), (model, "cuda")):
        opt = make(m.parameters())
        kept = list(m.parameters())
        seen = []
        kept[0].register_hook(lambda g: g * 0.5)
        kept[1].register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.shape))
        kept[1].no_decay = True
        m.to(device)
        assert [p is q for p, q in zip(kept, m.parameters())] == [True, True] and m.head.weight is kept[0]
        assert all(p.device.type == device for p in kept) and kept[1].no_decay
        tokens = torch.tensor([1, 2, 3]).to(device)
        norms_and_losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = m.head(m.embed(tokens)).pow(2).mean()
            loss.backward()
            norms_and_losses.append(torch.nn.utils.clip_grad_norm_(kept, 0.05).item())
            opt.step()
            norms_and_losses.append(loss.item())
        m.cpu()
        assert kept[0] is m.embed.weight and kept[0].device.type == "cpu" and kept[1].no_decay
        runs.append((norms_and_losses, seen, kept[0].detach().clone()))
    assert runs[0][0][1] != runs[0][0][5] and runs[0][1] == [(10,)] * 3
    torch.testing.assert_close(runs[1], runs[0], **FP32)


def test_a_parameter_that_cannot_be_swapped_is_replaced_and_its_optimizer_follows():
    """Where torch refuses to swap a parameter (a weak reference to it), the move makes a new one,
    as it did before, and an optimizer made before the move is pointed at it."""
    import weakref

    torch.manual_seed(0)
    local = nn.Linear(4, 2)
    remote = copy.deepcopy(local)
    runs = []
    for m, device in ((local, "cpu"), (remote, "cuda")):
        opt = torch.optim.AdamW(m.parameters(), lr=0.05)
        old = m.weight
        watcher = weakref.ref(old)
        m.to(device)
        assert (m.weight is old) == (device == "cpu") and watcher() is old
        x = torch.ones(3, 4).to(device)
        for _ in range(2):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        assert opt.param_groups[0]["params"][0] is m.weight
        runs.append(m.weight.detach().cpu())
    torch.testing.assert_close(runs[1], runs[0], **FP32)


def test_equal_allclose_and_nvtx():
    a = torch.tensor([1.0, 2.0, 3.0])
    ra = a.cuda()
    assert torch.equal(ra, ra.clone()) and not torch.equal(ra, ra + 1) and not torch.equal(ra, ra[:2])
    assert torch.allclose(ra, ra + 1e-9) and not torch.allclose(ra, ra + 1e-3)
    assert torch.allclose(ra, ra + 1e-3, atol=1e-2) and ra.allclose(ra)
    torch.cuda.nvtx.range_push("step")
    torch.cuda.nvtx.range_pop()
    with torch.cuda.nvtx.range("forward {}", 1):
        same(ra * 2, a * 2)


# --- 14. what cannot work fails clearly, at once -------------------------------------------------
@torch.library.custom_op("moai_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


scaled_tanh.register_fake(lambda x, scale: torch.empty_like(x))
scaled_tanh.register_autograd(
    lambda ctx, grad: (grad * ctx.scale * (1 - torch.tanh(ctx.saved_tensors[0]) ** 2), None),
    setup_context=lambda ctx, inputs, output: (ctx.save_for_backward(inputs[0]),
                                               setattr(ctx, "scale", inputs[1])))


@torch.library.custom_op("moai_test::cuda_kernel", mutates_args=(), device_types="cuda")
def cuda_kernel(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_ops_written_in_torch_ops_run_as_their_ops(reduction):
    """No worker runs another library's operators: one implemented in torch's ops for every
    device (a program's torch.library.custom_op, torch's own chunked linear_cross_entropy) runs as
    those ops; its autograd formula is the op's own."""
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    def run(device):
        g = torch.Generator().manual_seed(0)
        x, w = (torch.randn(*shape, generator=g).to(device).requires_grad_() for shape in ((6, 8), (5, 8)))
        target = torch.tensor([0, 1, 2, 3, 4, 1]).to(device)
        loss = torch.nn.functional.linear_cross_entropy(
            scaled_tanh(x, 1.5), w, target, reduction=reduction,
            options=LinearCrossEntropyOptions(batch_chunk_size=2))
        loss.sum().backward()
        return [t.detach().cpu() for t in (loss, x.grad, w.grad)]

    for got, expected in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_products_with_an_output_dtype_accumulate_in_it_as_cuda_does(dtype):
    """``torch.mm(a, b, out_dtype=torch.float32)`` and its bmm/addmm/baddbmm kin exist for CUDA
    only: a CPU worker failed them at the next sync. It computes them from the inputs converted
    exactly to the output dtype."""
    g = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(*shape, generator=g).to(dtype) for shape in ((5, 7), (7, 3), (5, 3)))
    ba, bb, bbias = (torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 5, 7), (2, 7, 3), (2, 5, 3)))
    f32 = torch.float32
    da, db, dbias, dba, dbb, dbbias = (t.cuda() for t in (a, b, bias, ba, bb, bbias))
    # float32 sums: in another order where the inner dim is split over GPUs, so to float32's
    # precision; an accumulation in the low dtype would be off by far more.
    same(torch.mm(da, db, out_dtype=f32), a.float() @ b.float(), **FP32)
    same(torch.bmm(dba, dbb, out_dtype=f32), ba.float() @ bb.float(), **FP32)
    same(torch.addmm(dbias.float(), da, db, out_dtype=f32, beta=0.5, alpha=2.0),
         torch.addmm(bias.float(), a.float(), b.float(), beta=0.5, alpha=2.0), **FP32)
    same(torch.baddbmm(dbbias.float(), dba, dbb, out_dtype=f32, alpha=0.25),
         torch.baddbmm(bbias.float(), ba.float(), bb.float(), alpha=0.25), **FP32)
    out = torch.empty(5, 3, device="cuda")
    assert torch.mm(da, db, out_dtype=f32, out=out) is out
    same(out, a.float() @ b.float(), **FP32)
    # Rounded once, as one device rounds it, however many GPUs summed it.
    same(torch.mm(da, db, out_dtype=dtype), a @ b)

    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    x, w = (torch.randn(*shape, generator=g) for shape in ((64, 8), (100, 8)))
    target = torch.randint(0, 100, (64,), generator=g)
    dx, dw = (t.to(dtype).cuda().requires_grad_() for t in (x, w))
    # On CUDA in bfloat16 its default options accumulate the gradients with out_dtype products.
    loss = F.linear_cross_entropy(dx, dw, target.cuda(), options=LinearCrossEntropyOptions())
    loss.backward()
    rx, rw = x.requires_grad_(), w.requires_grad_()
    F.cross_entropy(F.linear(rx.to(dtype), rw.to(dtype)).float(), target).backward()
    reference = F.cross_entropy(F.linear(x, w), target).detach()
    torch.testing.assert_close(loss.float().cpu(), reference, rtol=0.02, atol=0)
    torch.testing.assert_close(dx.grad.float().cpu(), rx.grad, rtol=0.02, atol=2e-3)
    torch.testing.assert_close(dw.grad.float().cpu(), rw.grad, rtol=0.02, atol=2e-3)


def test_torchscript_runs_on_the_device_and_its_archives_stay_on_the_host():
    model, (x, _) = mlp(), batch()
    for make in (torch.jit.script, lambda m: torch.jit.trace(m, x.to(next(m.parameters()).device))):
        native, remote = make(copy.deepcopy(model)), make(copy.deepcopy(model).cuda())
        native(x).square().sum().backward()
        remote(x.cuda()).square().sum().backward()
        for got, want in zip(remote.parameters(), native.parameters()):
            same(got.grad, want.grad, **FP32)
    archive = io.BytesIO()
    torch.jit.save(torch.jit.script(copy.deepcopy(model)), archive)
    with pytest.raises(NotImplementedError, match=r"torch\.jit\.save of a module with cuda:0 tensors"):
        torch.jit.save(torch.jit.script(copy.deepcopy(model).cuda()), io.BytesIO())
    for location in ("cuda", torch.device("cuda:0")):
        archive.seek(0)
        with pytest.raises(NotImplementedError,
                           match=r"torch\.jit\.load\(map_location='cuda(:0)?'\): TorchScript"):
            torch.jit.load(archive, map_location=location)
    archive.seek(0)
    loaded = torch.jit.load(archive, map_location="cpu")
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(NotImplementedError, match="moving a TorchScript module to cuda:0"):
        loaded.cuda()


class ScriptedFactories(nn.Module):
    """Scripted code calling torch functions the layer wraps: factories (nn.LSTM's own forward
    makes its zero state with ``torch.zeros``), ``take_along_dim``, ``is_autocast_enabled``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4, device=x.device) + float(torch.is_autocast_enabled())
        out = self.lstm(x.unsqueeze(0))[0][0] + h
        return torch.take_along_dim(out, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device), dim=1)


def test_scripted_modules_that_call_wrapped_torch_functions_compile():
    """TorchScript knows a builtin by its identity: it tried to compile the layer's wrappers from
    their source ("got builtin_function_or_method"), so any scripted module making a tensor with
    ``torch.zeros`` (an LSTM) failed to script on the platform."""
    torch.manual_seed(0)
    model, (x, _) = ScriptedFactories(), batch()
    native, remote = torch.jit.script(copy.deepcopy(model)), torch.jit.script(copy.deepcopy(model).cuda())
    native(x).sum().backward()
    remote(x.cuda()).sum().backward()
    for got, want in zip(remote.parameters(), native.parameters()):
        same(got.grad, want.grad, **FP32)


def test_device_checks_made_before_the_dispatcher_name_cuda():
    """CUDA's messages: the C++ checks of RNNs, stft, take_along_dim and tensor_split printed the
    device's registered name ("parameter tensor at moai:0")."""
    host = torch.randn(5, 1, 3)
    checks = {
        "found input tensor at cpu and parameter tensor at cuda:0": lambda: nn.LSTM(3, 4).cuda()(host),
        "parameter tensor at cuda:0": lambda: nn.GRU(3, 4).cuda()(host),
        "found input tensor at cuda:0 and hidden tensor at cpu":
            lambda: nn.RNN(3, 4).cuda()(host.cuda(), torch.zeros(1, 1, 4)),
        "got self on cuda:0 and window on cpu": lambda: torch.stft(torch.randn(64).cuda(), 16,
                                                                 window=torch.hann_window(16), return_complex=True),
        "Expected tensor to have cuda:0 Device": lambda: torch.randn(3, 4).cuda().take_along_dim(
            torch.zeros(3, 1, dtype=torch.long), dim=1),
        "to be on cpu, but it's on cuda:0": lambda: torch.tensor_split(torch.randn(6).cuda(),
                                                                       torch.tensor([2]).cuda()),
    }
    for message, run in checks.items():
        with pytest.raises(RuntimeError, match=re.escape(message)) as info:
            run()
        assert "moai" not in str(info.value)


def test_a_custom_op_with_cuda_kernels_only_is_refused_at_its_call():
    from offload.unsupported import DirectCudaError

    x = torch.ones(3, device="cuda")
    with pytest.raises(DirectCudaError, match="moai_test::cuda_kernel"):
        cuda_kernel(x)
    assert (x + 1).sum().item() == 6.0


def test_cuda_extensions_fail_clearly():
    from torch.utils import cpp_extension

    from offload.unsupported import DirectCudaError

    with pytest.raises(DirectCudaError, match=r"torch\.utils\.cpp_extension\.load_inline with CUDA "
                                              r"sources is not supported.*direct CUDA use"):
        cpp_extension.load_inline(name="moai_test_ext", cpp_sources="", cuda_sources="__global__ void k(){}",
                                  functions=["k"])
    with pytest.raises(DirectCudaError, match="cpp_extension.load with CUDA sources"):
        cpp_extension.load(name="moai_test_ext2", sources=["kernel.cu"])
    with pytest.raises(DirectCudaError, match="CUDAExtension"):
        cpp_extension.CUDAExtension("x", ["x.cu"])
    with pytest.raises(DirectCudaError, match="torch.cuda._lazy_init"):
        torch.cuda._lazy_init()
    identity = torch.cuda.jiterator._create_jit_fn("template <typename T> T identity(T x) { return x; }")
    with pytest.raises(DirectCudaError, match=r"torch\.cuda\.jiterator\._create_jit_fn"):
        identity(torch.ones(2, device="cuda"))   # made at import by some modules: refused when run


def test_unsupported_stream_semantics_fail_clearly():
    from offload.unsupported import DirectCudaError

    checks = [
        (lambda: torch.cuda.Stream().cuda_stream, r"torch\.cuda\.Stream\.cuda_stream"),
        (lambda: torch.cuda.ExternalStream(1234), r"torch\.cuda\.ExternalStream"),
        (lambda: torch.cuda.Event(interprocess=True), r"Event\(interprocess=True\)"),
        (lambda: torch.cuda.graph(None), "CUDA graphs"),
        (lambda: torch.cuda.CUDAGraph(), "CUDA graphs"),
    ]
    for call, api in checks:  # each raises at once (the module's timeout catches a hang)
        with pytest.raises(DirectCudaError, match=api):
            call()
    # Still classes where torch has classes: libraries annotate with them at import time
    # (transformers: ``-> torch.cuda.CUDAGraph | None``) and subclass them; only making one fails.
    for cls in (torch.cuda.CUDAGraph, torch.cuda.graph, torch.cuda.ExternalStream, torch.cuda.MemPool,
                torch.cuda.CUDAPluggableAllocator):
        assert isinstance(cls, type) and (cls | None) is not None and not isinstance(torch.zeros(1), cls)
        subclass = type("Mine", (cls,), {})
        with pytest.raises(DirectCudaError):
            subclass()
