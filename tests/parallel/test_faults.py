"""Errors on a multi-GPU device (faults_front.py against a LocalJob): an error every worker hits
leaves the device usable; one only some workers hit (their rows of the batch) fails the job in
seconds with its cause, where the other workers used to wait in a collective for the group's
timeout and the program then heard only that a worker was gone (daemons/worker/group_faults.py)."""
from __future__ import annotations

import pytest

from daemons.worker.local_job import LocalJob
from tests.parallel import fronts

pytestmark = pytest.mark.timeout(600)

OUT_OF_STEP_S = 5.0
COLLECTIVE_TIMEOUT_S = 120.0   # far above what the program may wait: the wait is not a timeout's


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_error_in_one_workers_rows_fails_the_job_in_seconds_with_its_cause(world_size, tmp_path):
    with LocalJob(world_size, collective_timeout_s=COLLECTIVE_TIMEOUT_S, out_of_step_s=OUT_OF_STEP_S) as job:
        steps = {r["step"]: r for r in fronts.run_front("faults_front.py", job, tmp_path)}
    everywhere = steps["bad_class_everywhere"]
    assert "out of bounds" in everywhere["error"] and "out of step" not in everywhere["error"], everywhere
    assert steps["after_bad_class_everywhere"]["value"] == sum(range(40)), steps["after_bad_class_everywhere"]

    bad = steps["bad_class_in_last_row"]
    assert bad["error"].startswith("DeviceLostError: CUDA error: the virtual device cuda:0 was lost"), bad
    assert "out of bounds" in bad["error"] and "out of step" in bad["error"], bad
    assert f"rank {world_size - 1}" in bad["error"], bad      # the last row lives on the last rank
    assert bad["seconds"] < OUT_OF_STEP_S + 15, bad
    # Lost for good, raised by the front itself: nothing is sent to workers stuck in a collective.
    after = steps["after_bad_class"]
    assert after["error"] == bad["error"] and after["seconds"] < 0.5, after
