"""The product promise, end to end: an unmodified reference script trains through the real
daemons with the same per-step losses as the same script run natively on the CPU.

Both runs are subprocesses of the very script in examples/; the native run has the offload layer
switched off, the offloaded one goes through ``moai run`` against a real embedded cluster. Device
sizes of 1, 2 and 4 GPUs check that automatic parallelization does not change the numbers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import start_cluster, wait_until

pytestmark = pytest.mark.timeout(900)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEP_LINE = re.compile(r"^\[Step (\d+)/(\d+)\] \| Loss: (\S+) \| Duration: (\S+) \| "
                       r"Throughput: (\S+) tokens/sec$", re.M)
# name -> (script arguments, flavor number per worker count)
RUNS = {
    "llama": ["--steps", "3", "--batch-size", "4", "--seq-len", "32"],
    "mlp": ["--steps", "4", "--batch-size", "32", "--workers", "0"],
}
FLAVOR_FOR_GPUS = {1: 1, 2: 2, 4: 3}   # Small.64GB, Medium.128GB, Large.256GB
# fp32 on one worker runs the same kernels in the same order: near bit-equal. More workers change
# the order of the gradient reductions, hence the looser bound (issue 5 states rtol 1e-4).
RTOL = {1: 1e-5, 2: 1e-4, 4: 1e-4}


def losses(output: str) -> list[float]:
    found = [(int(m[1]), float(m[3])) for m in STEP_LINE.finditer(output)]
    assert found, f"no step log lines in:\n{output[-3000:]}"
    assert [s for s, _ in found] == list(range(1, len(found) + 1))
    return [loss for _, loss in found]


def native_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
    env["MOAI_OFFLOAD"] = "0"
    return env


@pytest.fixture(scope="module")
def native_losses():
    cache = {}

    def run(name: str) -> list[float]:
        if name not in cache:
            out = subprocess.run([sys.executable, "train.py", *RUNS[name]], cwd=EXAMPLES / name,
                                 env=native_env(), capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            cache[name] = losses(out.stdout)
        return cache[name]
    return run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("acceptance"), gpus_per_node=4) as c:
        yield c


def offloaded(cluster, name: str) -> subprocess.CompletedProcess:
    return cluster.run(sys.executable, "-m", "offload.launcher", "run", sys.executable, "train.py",
                       *RUNS[name], cwd=EXAMPLES / name, timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_reference_model_matches_native_cpu(cluster, native_losses, name, gpus):
    cluster.client().call("set_device_flavor", {"flavor": FLAVOR_FOR_GPUS[gpus]})
    logs = [f"worker-{gpu:02d}" for gpu in range(4)]
    before = [len(cluster.head.log(log)) for log in logs]
    out = offloaded(cluster, name)
    assert out.returncode == 0, out.stderr[-3000:]
    if gpus > 1:
        # The front's hints reach the workers: each worker of the job logs at exit where its
        # uploads went (spmd.py), and the batches were split over them.
        def exit_lines():
            text = "".join(cluster.head.log(log)[start:] for log, start in zip(logs, before))
            found = re.findall(r"uploads by hint -> placement: (\{.*\})", text)
            return found if len(found) == gpus else None
        placed = wait_until(exit_lines, 60, "the workers' exit logs")
        assert all("'batch -> shard'" in p and "'param -> replicate'" in p for p in placed), placed
    got, want = losses(out.stdout), native_losses(name)
    assert len(got) == len(want)
    assert got == pytest.approx(want, rel=RTOL[gpus]), f"offloaded {got} vs native {want}"
    usage = cluster.client().call("usage")["records"]
    assert any(r["gpus"] == gpus and r["gpu_seconds"] > 0 for r in usage), usage


@pytest.mark.slow
def test_moreh_smi_shows_the_running_job(cluster):
    cluster.client().call("set_device_flavor", {"flavor": 1})
    front = subprocess.Popen([sys.executable, "-m", "offload.launcher", "run", sys.executable,
                              "train.py", "--steps", "40", *RUNS["llama"][2:]],
                             cwd=EXAMPLES / "llama", env=cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        table = ""
        while time.monotonic() < deadline:
            table = cluster.run("moreh-smi", timeout_s=60).stdout
            if str(front.pid) in table:
                break
            time.sleep(1.0)
        assert str(front.pid) in table, table
        row = next(line for line in table.splitlines() if str(front.pid) in line)
        assert "python" in row and "MiB" in row, row
    finally:
        front.kill()
        front.wait(timeout=30)
