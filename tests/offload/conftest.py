"""Fixtures of the offload runtime tests: real worker daemons and a session connected to them.

``worker`` is one worker daemon for a test (worker_fixture.py). ``dev`` is the virtual device of
this test process, its session connected straight to one worker (no master): every in-process
test shares it, as the ops of one program share their job. With ``MOAI_TEST_GPUS=N`` the session
is a job of N workers instead (LocalJob), a device of N GPUs, and the tests marked ``one_gpu``
(a figure that differs by design on several GPUs, with the reason) are skipped:
tests/parallel/test_offload_suite_on_gpus.py runs the suite so. End-to-end tests through the
master and agent start the real stack with tests/cluster.py.
"""
import os

import pytest

from daemons.worker.local_job import LocalJob
from offload import device
from worker_fixture import SECRET, WORKER_MEMORY_CAP, start_worker

GPUS = int(os.environ.get("MOAI_TEST_GPUS", "1"))

# Before any test runs a backward: torch's autograd engine sizes its per-device queues when it
# first starts, and a device registered after that has none (an internal assert at the first
# backward on it). In a program the hook registers it at ``import torch``.
device.register()


@pytest.fixture
def worker(tmp_path):
    w = start_worker(tmp_path / "worker")
    yield w
    w.stop()


@pytest.fixture(scope="session")
def dev(tmp_path_factory):
    """The virtual device, its session on one worker of ``WORKER_MEMORY_CAP`` bytes."""
    import offload.dispatch  # noqa: F401  (the transfer rules)
    from offload import device, session

    device.register()
    if GPUS > 1:
        with LocalJob(GPUS, memory_cap=WORKER_MEMORY_CAP) as job:
            session.connect([spec.bind for spec in job.specs], job.secret)
            try:
                yield device.DEVICE
            finally:
                session.close()
        return
    w = start_worker(tmp_path_factory.mktemp("session-worker"))
    try:
        session.connect([w.address], SECRET)
        yield device.DEVICE
    finally:
        session.close()
        w.stop()


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("one_gpu")
    if marker is not None and GPUS > 1:
        pytest.skip(f"one GPU only: {marker.args[0]}")


@pytest.fixture(scope="module")
def activated(dev):
    """The layer switched on as ``import torch`` does it in a user's process (idempotent), for a
    module's tests: ``pytestmark = pytest.mark.usefixtures("activated")``."""
    from offload import activation, device_mapping

    activation.activate()
    device_mapping.install()  # again: a fixture of test_offload_training.py uninstalls it
