"""A real front program (spmd_front.py) trains small models on a job of 2 and 4 worker daemons,
each model three ways in one process: with the backward run by the workers (the default,
offload/remote_backward.py), with it traced op by op on the front, and natively on the CPU. Both
device ways must give the CPU's losses and parameters (dropout's random numbers are the device's:
there, the two device ways must agree), and the workers' backward must cost the front one record
instead of one per gradient op. The losses are normalized by the batch's size (split unevenly
over 4 workers) or by the targets' total weight (ignored targets, class weights).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from daemons.worker.local_job import REPO_ROOT, LocalJob
from tests.offload.worker_fixture import clean_env
from tests.parallel import fronts

pytestmark = pytest.mark.timeout(600)

# Reductions over a split batch add in another order than one device (docs/PARALLELISM.md).
RTOL, ATOL = 1e-5, 1e-6


def run_front(job: LocalJob, tmp_path) -> dict[str, dict]:
    return {r["model"]: r for r in fronts.run_front("spmd_front.py", job, tmp_path)}


def assert_same_training(got: dict, expected: dict, what: str):
    torch.testing.assert_close(got["losses"], expected["losses"], rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what} losses: {m}")
    for i, (p, q) in enumerate(zip(got["params"], expected["params"])):
        torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what} parameter {i}: {m}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_backward_on_the_workers_trains_as_one_device(world_size, tmp_path):
    with LocalJob(world_size) as job:
        results = run_front(job, tmp_path)
        stats = job.call("memory_stats", {})[0]
    assert set(results) == {"mse", "smooth_l1", "bce", "group_norm", "dropout", "cross_entropy_padded",
                            "cross_entropy_weighted", "encoder", "gru", "attention_padded",
                            "split_dropout", "channels_last"}
    for name, r in results.items():
        # One record for the backward: a traced one sends each gradient op.
        assert r["remote"]["records"] < r["traced"]["records"], (name, r["remote"]["records"])
        assert_same_training(r["remote"], r["traced"], f"{name}: backward on the workers vs traced")
        if "dropout" not in name:
            assert_same_training(r["remote"], r["native"], f"{name}: on the device vs CPU")
    # The ops DTensor would have run by a rule derived from their decompositions, or by its own
    # rule for cross-entropy, wrongly.
    assert {"aten::mse_loss_backward", "aten::native_group_norm_backward",
            "aten::nll_loss_forward"} <= set(stats["decomposed"])
    # Attention with a padding mask (the encoder's, GPT-2's) runs batch-sharded, never on whole
    # tensors: DTensor does not move a keyword argument (the CPU kernels' mask) for a rule.
    assert not [op for op in stats["fallbacks"] if "attention" in op], stats["fallbacks"]


def test_a_program_that_catches_out_of_memory_trains_on_with_a_smaller_batch(tmp_path):
    """On a device of several GPUs the OOM must be raised at the op too: raised at the next sync,
    the program had gone on past the failed op, and the retry failed on AdamW state made of
    tensors never created ("missing_tensor")."""
    with LocalJob(2, memory_cap=64 << 20) as job:
        out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "offload" / "batch_size_finder.py"),
                              job.secret, *[s.bind for s in job.specs]],
                             env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "moai::linear ran out of device memory" in out.stderr and "each of the 2 GPUs" in out.stderr, out.stderr
    result = json.loads(out.stdout)
    assert result["device"]["size"] == 64
    torch.testing.assert_close(result["device"]["losses"], result["cpu"]["losses"], rtol=RTOL, atol=ATOL)
