"""Fixtures of the offload runtime tests: real worker daemons and a session connected to them.

``worker`` is one worker daemon for a test (worker_fixture.py). ``dev`` is the virtual device of
this test process, its session connected straight to one worker (no master): every in-process
test shares it, as the ops of one program share their job. End-to-end tests through the master
and agent start the real stack with tests/cluster.py.
"""
import pytest

from offload import device
from worker_fixture import SECRET, start_worker

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

    w = start_worker(tmp_path_factory.mktemp("session-worker"))
    device.register()
    try:
        session.connect([w.address], SECRET)
        yield device.DEVICE
    finally:
        session.close()
        w.stop()


@pytest.fixture(scope="module")
def activated(dev):
    """The layer switched on as ``import torch`` does it in a user's process (idempotent), for a
    module's tests: ``pytestmark = pytest.mark.usefixtures("activated")``."""
    from offload import activation, device_mapping

    activation.activate()
    device_mapping.install()  # again: a fixture of test_offload_training.py uninstalls it
