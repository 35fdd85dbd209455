"""Issue 5, model parallelism: a model whose parameters and Adam state do not fit one worker's cap
trains on 4 workers with the same losses as a native run.

The user script is examples/llama/train.py with a wider model (``--dim 192``), unmodified, run
natively on the CPU and through ``moai run`` against a real embedded cluster whose virtual GPUs
have a small memory cap, as test_reference_models.py does for the examples.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.acceptance.test_reference_models import EXAMPLES, RUNS, losses, native_env
from tests.cluster import start_cluster, wait_until

pytestmark = pytest.mark.timeout(900)

LLAMA = EXAMPLES / "llama"
SCRIPT = "train.py"
ARGS = [*RUNS["llama"], "--dim", "192"]     # --steps 3 --batch-size 4 --seq-len 32
GPUS = 4
# The cap, from the parameter count. Llama(dim=192) (hidden 512) has 910,272 float32
# parameters: P = 3,641,088 bytes (3.47 MiB). Replicated AdamW training holds 4P = 13.9 MiB per
# worker (parameter, gradient, exp_avg, exp_avg_sq), before any activation.
# - 1 GPU: 4P = 13.9 MiB > 8 MiB: the optimizer's state cannot be allocated, whatever the batch.
# - 4 GPUs: 4P > 0.75 * 8 MiB switches parameters to Shard(0) (ZeRO-3, placement.py) once 1.5 MiB
#   of parameters are uploaded; each worker then holds 4P / 4 = 3.5 MiB of training state plus
#   a quarter of the batch's activations and transient all-gathered weights (the largest, w1, is
#   0.4 MiB): 4.8 MiB peak measured, within the 8 MiB cap.
CAP_MB = 8
PARAM_BYTES = 910_272 * 4
assert 4 * PARAM_BYTES > CAP_MB << 20 > 4 * PARAM_BYTES / GPUS + (2 << 20)
FLAVOR_FOR_GPUS = {1: 1, 4: 3}  # Small.64GB, Large.256GB
RTOL = 1e-4                     # issue 5: reduction order differs over 4 workers
ZERO3 = "exceed the replicated budget: sharding them (ZeRO-3)"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("model-parallel"), gpus_per_node=GPUS,
                       virtual_gpu_memory_mb=CAP_MB) as c:
        yield c


def offloaded(cluster, gpus: int) -> subprocess.CompletedProcess:
    cluster.client().call("set_device_flavor", {"flavor": FLAVOR_FOR_GPUS[gpus]})
    return cluster.run(sys.executable, "-m", "offload.launcher", "run", sys.executable, SCRIPT,
                       *ARGS, cwd=LLAMA, timeout_s=600)


def worker_logs(cluster) -> list[str]:
    return [cluster.head.log(f"worker-{gpu:02d}") for gpu in range(GPUS)]


@pytest.mark.slow
def test_wide_model_does_not_fit_one_gpu(cluster):
    out = offloaded(cluster, 1)   # cluster.run's timeout: a hang fails the test
    assert out.returncode != 0, out.stdout[-2000:]
    assert "torch.OutOfMemoryError" in out.stderr and "out of memory" in out.stderr, out.stderr[-3000:]
    assert not re.search(r"^\[Step 2/", out.stdout, re.M), out.stdout


@pytest.mark.slow
def test_wide_model_trains_sharded_on_four_gpus(cluster):
    native = subprocess.run([sys.executable, SCRIPT, *ARGS], cwd=LLAMA, env=native_env(),
                            capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr[-3000:]
    before = [len(text) for text in worker_logs(cluster)]

    out = offloaded(cluster, GPUS)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = losses(out.stdout), losses(native.stdout)
    assert len(got) == len(want)
    assert got == pytest.approx(want, rel=RTOL), f"offloaded {got} vs native {want}"

    # Each worker logs its ZeRO-3 decision, and at exit where the front's hinted uploads went:
    # the parameters sharded, the batches (inputs, targets) split over the workers.
    def job_logs():
        logs = [text[start:] for text, start in zip(worker_logs(cluster), before)]
        return logs if all("uploads by hint -> placement" in text for text in logs) else None
    logs = wait_until(job_logs, 60, "the workers' exit logs")
    for rank, text in enumerate(logs):
        assert ZERO3 in text, f"worker {rank}:\n{text[-3000:]}"
        placed = re.search(r"uploads by hint -> placement: (\{.*\})", text)[1]
        assert "'param -> shard'" in placed and "'batch -> shard'" in placed, placed
