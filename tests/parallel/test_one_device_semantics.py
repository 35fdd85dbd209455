"""Tensors split over a job's workers behave as on one device (semantics_front.py, against the CPU
in the same process). Writes through views, and into their bases, give one device's values: DTensor
makes a view across the split dim as a copy (daemons/worker/detached_views.py), and without keeping
the two in step 18 of 22 such writes were silently lost on 2 workers, transformers' padding mask
among them. Tensors of the dtypes gloo cannot move (int16, wide unsigned ints, float8) read back
(daemons/worker/collectives.py). Batches that would leave a worker an empty piece are not split
(daemons/worker/placement.py): a reduction failed on that worker alone and the job hung."""
from __future__ import annotations

import pytest
import torch

from daemons.worker.local_job import LocalJob
from tests.parallel import fronts

pytestmark = pytest.mark.timeout(600)

# Only the autograd case reduces over a split batch (another order of additions than one device's).
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("world_size", [2, 4])
def test_views_writes_and_dtypes_as_on_one_device(world_size, tmp_path):
    with LocalJob(world_size) as job:
        results = fronts.run_front("semantics_front.py", job, tmp_path)
        stats = job.call("memory_stats", {})
    assert [r["case"] for r in results] == [
        "padding_mask", "select_fill", "slices", "tiny_batch", "base_written_after", "splits",
        "reshaped_views", "chains_and_out", "resized", "dtypes_collectives_lack",
        "small_batches", "autograd_through_views"]
    for r in results:
        assert "error" not in r, f"{r['case']}: {r['error']}"
        for i, (got, expected) in enumerate(zip(r["device"], r["cpu"], strict=True)):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{r['case']}, value {i}: {m}")
    # The bookkeeping goes with the views: every case's tensors were freed.
    assert [s["detached_views"] for s in stats] == [0] * world_size
