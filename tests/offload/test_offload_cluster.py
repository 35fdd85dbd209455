"""Front processes on the real stack (master, agent, workers under supervisord): the session
allocates its job, waits its turn in the queue, trains like the CPU, and releases the job or
fails clearly when its worker dies."""
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster import start_cluster, wait_until
from worker_fixture import FRONT_PROGRAM, REPO_ROOT

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
FAILURE_DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # One GPU: a second front has to queue.
    with start_cluster(tmp_path_factory.mktemp("offload"), gpus_per_node=1) as c:
        yield c


def front(cluster, *args: str, token: str | None = None) -> subprocess.Popen:
    env = cluster.env if token is None else {**cluster.env, "MOAI_TOKEN": token}
    return subprocess.Popen([sys.executable, str(FRONT_PROGRAM), *args], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(stdout: str) -> list[float]:
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step")]


def jobs(cluster) -> list[dict]:
    return cluster.admin.call("list_all_jobs")["jobs"]


def test_training_matches_the_cpu_and_the_job_is_released(cluster):
    native = subprocess.run([sys.executable, str(FRONT_PROGRAM), "--cpu"], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)
    out = cluster.run(sys.executable, str(FRONT_PROGRAM), "--steps", "3", cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(out.stdout) == losses(native.stdout) and len(losses(out.stdout)) == 3
    job = jobs(cluster)[-1]
    assert job["state"] == "finished", job
    assert "front_program.py" in job["process"]
    wait_until(lambda: cluster.head.program("workers:worker-00")["statename"] != "RUNNING", 30,
               "the worker to stop after the job")


def test_gpu_telemetry_reaches_the_program(cluster):
    """``torch.cuda.utilization()`` and ``memory_usage()`` read the device's GPUs as moreh-smi
    does; virtual GPUs have no temperature or power sensor, and say so."""
    out = cluster.run(sys.executable, str(FRONT_PROGRAM), "--steps", "2", "--telemetry", cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    _, util, mem = next(line for line in lines if line.startswith("utilization")).split()
    assert 0 <= int(util) <= 100 and 0 <= int(mem) <= 100
    assert [line for line in lines if line.startswith("no sensor")] == [
        f"no sensor: torch.cuda.{name}: the GPUs of the virtual device cuda:0 do not report it "
        "(moreh-smi shows what they do)" for name in ("temperature", "power_draw")]


def test_a_second_front_waits_in_the_queue_and_says_so_once(cluster):
    first = front(cluster, "--steps", "0")
    try:
        assert first.stdout.readline().startswith("step"), first.stderr.read() if first.poll() else ""
        second = front(cluster, "--steps", "2")
        wait_until(lambda: any(j["state"] == "queued" for j in jobs(cluster)), 60, "the second job to queue")
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first job is released at exit
        out, err = second.communicate(timeout=120)
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert second.returncode == 0, err[-3000:]
    assert len(losses(out)) == 2
    assert err.count("is queued") == 1, err
    ended = jobs(cluster)[-2:]
    assert [j["state"] for j in ended] == ["finished", "finished"], [(j["state"], j["message"]) for j in ended]


def failed_mid_training(cluster, cause, token: str | None = None) -> str:
    """Start a front, let it train 3 steps, then ``cause()`` its failure: its stderr once it has
    exited with an error by itself, within FAILURE_DEADLINE_S."""
    runner = front(cluster, "--steps", "0", token=token)
    try:
        for _ in range(3):
            assert runner.stdout.readline().startswith("step"), runner.stderr.read() if runner.poll() else ""
        caused_at = time.monotonic()
        cause()
        try:
            _, err = runner.communicate(timeout=FAILURE_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the front did not fail within {FAILURE_DEADLINE_S:g} s")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    assert time.monotonic() - caused_at < FAILURE_DEADLINE_S
    assert runner.returncode != 0
    return err


def test_worker_killed_mid_training_fails_the_front_with_the_cause(cluster):
    def kill_the_worker():
        subprocess.run(["kill", "-KILL", str(cluster.head.pid("workers:worker-00"))], check=True)

    err = failed_mid_training(cluster, kill_the_worker)
    assert "virtual device cuda:0 was lost" in err, err
    assert "worker on node0:0" in err and "killed" in err, err  # the master's account of the cause
    assert jobs(cluster)[-1]["state"] == "failed"


def test_a_token_revoked_mid_training_stops_the_front_with_the_reason(cluster):
    token = cluster.admin.call("create_token", {"user": "mallory"})["token"]

    def revoke():
        assert len(cluster.admin.call("revoke_token", {"token": token})["ended_jobs"]) == 1

    err = failed_mid_training(cluster, revoke, token)
    assert "virtual device cuda:0 was lost" in err and "revoked by the cluster's administrator" in err, err
    assert "Traceback" in err and err.count("Error") < 10, err  # one error, not a cascade
    job = jobs(cluster)[-1]
    assert job["state"] == "failed" and "revoked" in job["message"], job
    wait_until(lambda: cluster.head.program("workers:worker-00")["statename"] != "RUNNING", 30,
               "the worker to stop after the job")
