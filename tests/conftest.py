"""The test process itself runs stock torch. Once the offload hook is installed (`make install`),
any Python process on a configured machine (a token in ~/.moai, MOAI_TOKEN) would switch cuda:0 to
the virtual device at ``import torch``, this one included; tests that want the device start a
subprocess with their own environment (tests/cluster.py strips MOAI_* from what it hands down)."""
import os

os.environ["MOAI_OFFLOAD"] = "0"

import pytest  # noqa: E402  (the switch above must precede any import that may import torch)

from tests.cluster import start_cluster  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster(nodes=1, gpus_per_node=2, **settings): the shape of the "
                                       "real stack the `cluster` fixture starts")


@pytest.fixture
def cluster(request, tmp_path):
    """A real embedded stack per test (tests/cluster.py), shaped by the test's ``cluster`` marker;
    it fails the test if any of its processes outlives it."""
    marker = request.node.get_closest_marker("cluster")
    with start_cluster(tmp_path, **(marker.kwargs if marker else {})) as c:
        yield c
