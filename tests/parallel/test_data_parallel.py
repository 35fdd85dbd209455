"""Automatic data parallelism on real worker daemons, checked against one device.

Each test starts a job's N worker processes (daemons/worker/main.py, gloo on loopback) and drives
them with ``wire.Client`` as the front does, with the recorded op stream of a real training step
(an MLP with dropout, cross-entropy, Adam; every ``.item()`` the program makes is a fetch). The
program ran natively on CPU while it was recorded; every value it read back and every trained
parameter must come out of the N workers the same, within float32 reduction-order noise.
"""
from __future__ import annotations

import socket
import time

import pytest
import torch

from daemons import wire
from daemons.wire import RemoteRef
from daemons.worker.local_job import LocalJob
from daemons.worker.op_recording import record_mlp_training

# Reductions over a split batch add in a different order than one device does (per-rank partial
# sums, then the all-reduce); float32 keeps ~7 significant digits, a few steps of Adam keep that.
RTOL, ATOL = 1e-5, 1e-6
# 10 rows do not split evenly over 4 workers (3, 3, 3, 1): uneven shards are part of the test.
BATCH = 10


def check_matches_native(job: LocalJob, recorder, model):
    reads = job.replay(recorder.steps)
    native = [step[2] for step in recorder.steps if step[0] == "fetch"]
    assert len(reads) == len(native) > 0
    for (value, _), expected in zip(reads, native):
        torch.testing.assert_close(value.item(), expected, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(job.fetch(recorder.handle(p)), p.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"parameter {name}: {m}")


def peak_bytes(job: LocalJob) -> int:
    return max(reply["peak"] for reply in job.call("memory_stats", {}))


@pytest.fixture(scope="module")
def reference():
    """The recording, and the single-worker peak memory of a batch large enough to dominate it."""
    recorder, model = record_mlp_training(batch=BATCH)
    large, _ = record_mlp_training(batch=512, steps=1)
    with LocalJob(1) as job:
        job.replay(large.steps)
        single_peak = peak_bytes(job)
    return recorder, model, large, single_peak


@pytest.mark.parametrize("world_size", [2, 4])
def test_training_matches_one_device(reference, world_size):
    recorder, model, large, single_peak = reference
    with LocalJob(world_size) as job:
        check_matches_native(job, recorder, model)
        assert all(reply["done_seq"] > 0 for reply in job.sync())
    with LocalJob(world_size) as job:
        job.replay(large.steps)
        # Activations dominate the large batch: split over N workers, each holds about 1/N.
        assert peak_bytes(job) < single_peak * (1.5 / world_size)


def test_zero3_when_replicated_state_does_not_fit(reference):
    recorder, model, _, _ = reference
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # Replicated params + grads + Adam moments (4x) would pass 3/4 of this cap: shard them.
    cap = int(4 * params / 0.75) - 1
    with LocalJob(2, memory_cap=cap) as job:
        check_matches_native(job, recorder, model)
        held = max(reply["allocated"] for reply in job.call("memory_stats", {}))
        assert held < 3 * params       # replicated, params + two moments alone are 3x


def test_zero3_re_places_aliases_of_earlier_parameters():
    """The front's ``nn.Parameter`` is a ``detach`` of the uploaded tensor, whose own id is freed:
    the switch to ZeRO-3 must re-place that alias too, or the replicated copy stays held."""
    params = [torch.randn(64, 32) for _ in range(4)]
    nbytes = params[0].nbytes
    cap = int(4 * 3.5 * nbytes / 0.75)       # 4 * P passes 3/4 of the cap at the 4th upload
    with LocalJob(2, memory_cap=cap) as job:
        for i, p in enumerate(params):
            upload, param = 2 * i + 1, 2 * i + 2
            job.send("put", {"id": upload, "tensor": p, "shard": "param"})
            job.send("run_ops", {"ops": [[i + 1, "aten::detach", [RemoteRef(upload)], {}, param]]})
            job.send("free", {"ids": [upload]})
        held = [reply["allocated"] for reply in job.call("memory_stats", {})]
        assert held == [len(params) * nbytes // 2] * 2       # each rank: half of every parameter
        for i, p in enumerate(params):
            torch.testing.assert_close(job.fetch(2 * i + 2), p)


def test_a_memory_fraction_lowers_the_budget_parameters_are_placed_against():
    """``torch.cuda.set_per_process_memory_fraction`` before the model is moved: the parameters
    that would fit replicated under the job's cap are sharded under the program's fraction of it."""
    params = [torch.randn(64, 32) for _ in range(4)]
    nbytes = params[0].nbytes
    cap = int(4 * 3.5 * nbytes / 0.75)       # as above: 4 * P passes 3/4 of the cap at the 4th upload
    with LocalJob(2, memory_cap=cap * 10) as job:
        job.call("set_memory_fraction", {"fraction": 0.1})
        for i, p in enumerate(params):
            job.send("put", {"id": i + 1, "tensor": p, "shard": "param"})
        held = [reply["allocated"] for reply in job.call("memory_stats", {})]
        assert held == [len(params) * nbytes // 2] * 2       # each rank: half of every parameter
        for i, p in enumerate(params):
            torch.testing.assert_close(job.fetch(i + 1), p)


def test_dead_peer_is_an_error_not_a_hang():
    recorder, _ = record_mlp_training(batch=BATCH, steps=1)
    first_op = next(i for i, step in enumerate(recorder.steps) if step[0] == "ops")
    timeout_s = 20.0
    with LocalJob(2, collective_timeout_s=timeout_s) as job:
        job.replay(recorder.steps[:first_op])
        job.sync()
        job.kill(1)
        start = time.monotonic()
        with pytest.raises(wire.RemoteError) as failure:
            job.replay(recorder.steps[first_op:])   # the first fetch needs a collective
            job.sync()
        assert time.monotonic() - start < timeout_s + 10
        assert "worker of the job is gone" in failure.value.message
        # The group stays broken: later requests fail at once instead of waiting again.
        start = time.monotonic()
        with pytest.raises(wire.RemoteError):
            job.replay(recorder.steps[first_op:])
        assert time.monotonic() - start < 5


def test_a_worker_that_cannot_start_fails_the_job_at_once_with_its_log():
    """A worker whose port is taken exits at startup: the job says so with that worker's log
    within seconds, instead of waiting out the group's formation timeout."""
    job = LocalJob(2)
    taken = socket.socket()
    taken.bind(("127.0.0.1", int(job.specs[1].bind.rsplit(":", 1)[1])))
    taken.listen()
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as failure:
            job.__enter__()
    finally:
        taken.close()
    assert time.monotonic() - start < 60
    assert "worker(s) [1] exited" in str(failure.value), failure.value
    assert "Address already in use" in str(failure.value), failure.value
