"""A front process whose worker dies: a clear error in seconds, never a hang."""
import signal
import subprocess
import sys
import time

import pytest

from worker_fixture import FRONT_PROGRAM, REPO_ROOT, SECRET, clean_env

pytestmark = pytest.mark.timeout(120)
FAILURE_DEADLINE_S = 20.0


def start_front(env: dict, *args: str) -> subprocess.Popen:
    env = dict(env, PYTHONFAULTHANDLER="1")  # a crash instead of an error shows every thread's stack
    return subprocess.Popen([sys.executable, str(FRONT_PROGRAM), "--steps", "0", *args], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(front: subprocess.Popen, n: int):
    for _ in range(n):
        line = front.stdout.readline()
        assert line.startswith("step"), (line, front.stderr.read() if front.poll() is not None else "")


def end_of(front: subprocess.Popen) -> str:
    """The front's stderr once it has exited, which it must do by itself within the deadline."""
    try:
        _, err = front.communicate(timeout=FAILURE_DEADLINE_S)
    except subprocess.TimeoutExpired:
        front.kill()
        front.communicate()
        pytest.fail(f"the front did not fail within {FAILURE_DEADLINE_S:g} s of losing its worker")
    assert front.returncode != 0
    return err


def test_worker_killed_mid_training_is_a_clear_error(worker, tmp_path):
    front = start_front(clean_env(tmp_path), "--direct", worker.address, SECRET)
    try:
        wait_for_steps(front, 3)
        killed_at = time.monotonic()
        worker.proc.send_signal(signal.SIGKILL)
        err = end_of(front)
    finally:
        if front.poll() is None:
            front.kill()
            front.communicate()
    assert time.monotonic() - killed_at < FAILURE_DEADLINE_S
    assert "DeviceLostError" in err and "virtual device cuda:0 was lost" in err, err
    assert worker.address in err  # which worker went away


BAD_INDEX_PROGRAM = """
import sys, torch
import offload.dispatch
from offload import device, session
device.register()
session.connect([sys.argv[1]], sys.argv[2])
x = torch.ones(3, device=device.DEVICE)
bad = torch.tensor([5], device=device.DEVICE)   # out of bounds: only the worker finds out
try:
    y = x[bad]
except RuntimeError as e:
    print("raised at the op:", str(e).splitlines()[0])
    sys.exit(0)
print("not raised at the op")
y.sum().item()
"""


def run_program(source: str, worker, tmp_path, *args: str, timeout_s: float,
                **env: str) -> subprocess.CompletedProcess:
    """``source`` run as a front process against ``worker`` (argv: its address, the secret, args)."""
    return subprocess.run([sys.executable, "-c", source, worker.address, SECRET, *args],
                          env=dict(clean_env(tmp_path), **env), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.mark.parametrize("blocking", ["1", "0"])
def test_cuda_launch_blocking_raises_a_device_error_at_its_op(worker, tmp_path, blocking):
    """Device errors come at the next sync point, as CUDA's do; CUDA_LAUNCH_BLOCKING=1, CUDA's
    switch for debugging them, makes each op wait, so the error is raised at its own line."""
    out = run_program(BAD_INDEX_PROGRAM, worker, tmp_path, timeout_s=60,
                      CUDA_LAUNCH_BLOCKING=blocking)
    if blocking == "1":
        assert out.returncode == 0, out.stderr
        assert "raised at the op: CUDA error on the virtual device cuda:0" in out.stdout, out.stdout
        assert "aten::index" in out.stdout and "out of bounds" in out.stdout, out.stdout
    else:
        assert "not raised at the op" in out.stdout, (out.stdout, out.stderr)
        assert out.returncode != 0 and "aten::index" in out.stderr
        assert "consider passing CUDA_LAUNCH_BLOCKING=1" in out.stderr, out.stderr


FAILING_HOOKS_PROGRAM = """
import sys, torch
from offload import activation, session
activation.activate()
session.connect([sys.argv[1]], sys.argv[2])

def boom(*args):
    raise ValueError("the hook refused")

def register(kind, lin, y):
    if kind == "tensor":
        y.register_hook(boom)
    elif kind == "parameter":
        lin.weight.register_hook(boom)
    elif kind == "node":
        y.grad_fn.register_hook(boom)
    elif kind == "node_pre":
        y.grad_fn.register_prehook(boom)
    elif kind == "accumulated":
        lin.weight.register_post_accumulate_grad_hook(boom)
    elif kind == "multi":
        torch.autograd.graph.register_multi_grad_hook((y,), boom)

for kind in sys.argv[3:]:
    lin = torch.nn.Linear(3, 3).cuda()
    if kind == "module":
        lin.register_full_backward_hook(boom)
    elif kind == "module_pre":
        lin.register_full_backward_pre_hook(boom)
    y = lin(torch.ones(2, 3, device="cuda") * 2)
    register(kind, lin, y)
    try:
        y.sum().backward()
        print(kind, "not raised")
    except ValueError as e:
        print(kind, "raised:", e)
# The device goes on working after them.
lin = torch.nn.Linear(3, 3).cuda()
lin(torch.ones(2, 3, device="cuda")).sum().backward()
print("then a backward gives", lin.bias.grad.tolist())
"""


def test_a_backward_hook_that_raises_fails_the_backward_not_the_process(worker, tmp_path):
    """A hook's exception on autograd's device thread ended the whole program on torch 2.13
    ("terminate called without an active exception"), whatever the hook was on; natively,
    ``backward()`` raises it. Each is now raised by the ``backward()`` call."""
    kinds = ["tensor", "parameter", "node", "node_pre", "accumulated", "module", "module_pre", "multi"]
    out = run_program(FAILING_HOOKS_PROGRAM, worker, tmp_path, *kinds, timeout_s=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:-1] == [f"{kind} raised: the hook refused" for kind in kinds], out.stdout
    assert lines[-1] == "then a backward gives [2.0, 2.0, 2.0]", out.stdout
