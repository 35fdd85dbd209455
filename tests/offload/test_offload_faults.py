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


@pytest.mark.parametrize("blocking", ["1", "0"])
def test_cuda_launch_blocking_raises_a_device_error_at_its_op(worker, tmp_path, blocking):
    """Device errors come at the next sync point, as CUDA's do; CUDA_LAUNCH_BLOCKING=1, CUDA's
    switch for debugging them, makes each op wait, so the error is raised at its own line."""
    env = dict(clean_env(tmp_path), CUDA_LAUNCH_BLOCKING=blocking)
    out = subprocess.run([sys.executable, "-c", BAD_INDEX_PROGRAM, worker.address, SECRET], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    if blocking == "1":
        assert out.returncode == 0, out.stderr
        assert "raised at the op: CUDA error on the virtual device cuda:0" in out.stdout, out.stdout
        assert "aten::index" in out.stdout and "out of bounds" in out.stdout, out.stdout
    else:
        assert "not raised at the op" in out.stdout, (out.stdout, out.stderr)
        assert out.returncode != 0 and "aten::index" in out.stderr
        assert "consider passing CUDA_LAUNCH_BLOCKING=1" in out.stderr, out.stderr

