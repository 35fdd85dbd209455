"""The master's Prometheus endpoint (daemons/master/metrics.py) on a real master: its figures
follow the books, every line is in the exposition format, and a taken port costs only the metrics."""
import re
import socket
import urllib.error
import urllib.request

import pytest

from daemons.loopback_ports import free_port
from master_fixture import FakeNode, FrontHeartbeats, MasterProcess
from tests.cluster import wait_until

pytestmark = pytest.mark.timeout(120)

SAMPLE = re.compile(r'[a-z_]+(\{([a-z_]+="(\\.|[^"\\])*",?)*\})? (-?[0-9.e+-]+|nan|inf)')


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP [a-z_]+ .+|TYPE [a-z_]+ (gauge|counter))", line), line
            continue
        assert SAMPLE.fullmatch(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


@pytest.fixture
def metrics_master(tmp_path):
    port = free_port()
    proc = MasterProcess(tmp_path, metrics_bind=f"127.0.0.1:{port}")
    proc.start()
    proc.metrics_port = port
    yield proc
    proc.stop()


def test_metrics_follow_nodes_gpus_jobs_and_usage(metrics_master):
    node = FakeNode(metrics_master, "n1", 2)
    node.register()
    try:
        node.faults[1] = ("over temperature: 93 C, slowdown at 90 C", False)
        alice = metrics_master.create_token("alice")
        a = metrics_master.client(alice)
        job = a.call("allocate_job", {"pid": 1, "process_name": "p", "hostname": "h"})
        with FrontHeartbeats(metrics_master, (alice, job["job_id"])):
            port = metrics_master.metrics_port
            wait_until(lambda: scrape(port).get('moai_jobs{state="running"}') == 1, 10, "the job in the metrics")
            wait_until(lambda: scrape(port).get('moai_gpu_fault{node="n1",gpu="1"}') == 1, 10, "the hot GPU")
            m = scrape(port)
            assert m['moai_node_up{node="n1"}'] == 1 and m['moai_node_drained{node="n1"}'] == 0
            assert m['moai_node_gpus{node="n1"}'] == 2
            assert m['moai_node_gpus_free{node="n1"}'] == 0, "one GPU held, the other hot"
            assert m['moai_gpu_temperature_celsius{node="n1",gpu="0"}'] == 40
            assert m['moai_gpu_fault{node="n1",gpu="0"}'] == 0
            assert m['moai_jobs{state="queued"}'] == 0
            assert m['moai_gpu_drained{node="n1",gpu="0"}'] == 0
            metrics_master.admin().call("drain_node", {"node": "n1", "gpu": 0})
            wait_until(lambda: scrape(port).get('moai_gpu_drained{node="n1",gpu="0"}') == 1, 10,
                       "the drained GPU in the metrics")
        a.call("release_job", {"job_id": job["job_id"]})
        wait_until(lambda: scrape(port).get('moai_jobs_ended_total{state="finished"}') == 1, 10,
                   "the ended job in the metrics")
        assert scrape(port)['moai_usage_gpu_seconds_total{user="alice"}'] > 0
        odd = metrics_master.client(metrics_master.create_token('eve "the" \\ admin'))
        odd.call("release_job", {"job_id": odd.call("allocate_job", {"pid": 1, "process_name": "p",
                                                                      "hostname": "h"})["job_id"]})
        escaped = 'moai_usage_gpu_seconds_total{user="eve \\"the\\" \\\\ admin"}'
        wait_until(lambda: escaped in scrape(port), 10, "a user name with quotes, escaped")
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert not_found.value.code == 404
    finally:
        node.close()


def test_a_taken_metrics_port_leaves_the_master_serving(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    proc = MasterProcess(tmp_path, metrics_bind=f"127.0.0.1:{taken.getsockname()[1]}")
    try:
        proc.start()
        assert proc.create_token("bob")
        assert "metrics are off: cannot serve at" in proc.log.read_text()
    finally:
        proc.stop()
        taken.close()
