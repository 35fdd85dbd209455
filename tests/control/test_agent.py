"""The agent with real processes: it registers its node and virtual GPUs, heartbeats telemetry,
starts a job's workers under supervisord and stops them, reports a worker's death, and survives
its own (supervisord restarts it and it re-adopts the workers still running)."""
import os
import signal
import time

import pytest

from daemons import wire
from daemons.agent.programs import ProgramState
from daemons.agent.state import AgentState
from stack_front import fronts  # noqa: F401
from tests.cluster import TEST_TIMINGS, wait_until

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
SETTLE_S = TEST_TIMINGS["heartbeat_timeout_s"] + 5   # a fault is noticed within one dead-peer timeout


def error_of(client, msg_type, body=None) -> wire.RemoteError:
    with pytest.raises(wire.RemoteError) as info:
        client.call(msg_type, body or {})
    return info.value


def node_row(cluster, name="node0") -> dict:
    return next(n for n in cluster.admin.call("list_nodes")["nodes"] if n["node"] == name)


def program_state(node, name: str) -> str:
    return node.program(name)["statename"]


def test_agent_state_blames_an_exit_only_on_the_job_whose_worker_was_started():
    state = AgentState(2)
    previous = {0: ProgramState(0, "STOPPED", 0, -1)}          # the last job's worker, gone
    assert state.claim(0, job_id=7) and state.observe(previous) == [], "not started yet: not ours"
    state.started(0)
    assert state.observe({0: ProgramState(0, "RUNNING", 42, 0)}) == []
    assert state.workers() == [{"gpu": 0, "job_id": 7, "state": "running"}]
    [crash] = state.observe({0: ProgramState(0, "EXITED", 0, -1)})
    assert (crash.job_id, crash.exit_code, crash.reason) == (7, None, "worker process was killed by a signal")
    assert state.claim(1, job_id=8) and state.release(1, job_id=8)
    assert state.observe({1: ProgramState(1, "STOPPED", 0, 0)}) == [], "a released job's exit is no crash"
    assert state.claim(0, job_id=9) and not state.release(0, job_id=8), "a late stop never hits the next job"


def test_agent_registers_its_gpus_heartbeats_telemetry_and_checks_requests(cluster):
    node = node_row(cluster)
    assert (node["alive"], node["gpus"], node["free"]) == (True, 2, 2)
    assert node["agent_addr"] == cluster.settings.agent_addr
    memory = cluster.settings.virtual_gpu_memory_mb * MIB
    assert [(g["index"], g["mem_total"], g["temp_c"]) for g in node["telemetry"]] == [(0, memory, None),
                                                                                      (1, memory, None)]
    for _ in range(5):
        assert node_row(cluster)["last_seen_s"] < TEST_TIMINGS["heartbeat_timeout_s"] / 2, "heartbeats go on"
        time.sleep(TEST_TIMINGS["heartbeat_interval_s"])

    agent = cluster.head.agent()
    status = agent.call("node_status")
    assert status["node"] == "node0" and status["workers"] == [] and len(status["gpus"]) == 2
    forged = wire.Client(cluster.settings.agent_addr, "guess", timeout_s=5)
    assert error_of(forged, "launch_worker", {"gpu": 0}).code == "unauthorized"
    forged.close()
    launch = {"job_id": 1, "gpu": 0, "rank": 0, "world_size": 1, "job_secret": "s",
              "rendezvous": "tcp://127.0.0.1:1", "memory_cap": MIB}
    for bad in ({"gpu": 2}, {"rank": 1}, {"job_id": "1"}, {"gpu": True}):
        bad = {**launch, **bad}
        assert error_of(agent, "launch_worker", bad).code == "bad_request", bad
    assert agent.call("stop_worker", {"job_id": 99, "gpu": 1}) == {}, "stopping what is not running is success"
    assert error_of(agent, "no_such_request").code == "unknown_type"
    assert program_state(cluster.head, "workers:worker-00") == "STOPPED", "refused launches start nothing"


def test_job_runs_real_workers_under_supervisord_until_released(cluster, fronts):
    cluster.client().call("set_device_flavor", {"flavor": "Medium"})
    front = fronts()
    job = front.allocate()
    assert (job["state"], job["message"]) == ("running", "running on 2 GPUs (node0)")
    assert [program_state(cluster.head, f"workers:worker-0{gpu}") for gpu in (0, 1)] == ["RUNNING"] * 2
    assert cluster.head.agent().call("node_status")["workers"] == [
        {"gpu": gpu, "job_id": job["job_id"], "state": "running"} for gpu in (0, 1)]
    memory = cluster.settings.virtual_gpu_memory_mb * MIB
    assert front.hello() == [{"job_id": job["job_id"], "rank": r, "world_size": 2, "device": "cpu",
                              "memory_cap": memory} for r in (0, 1)]
    stranger = wire.Client(front.status()["workers"][0]["address"], "another-jobs-secret", timeout_s=5)
    assert error_of(stranger, "hello").code == "unauthorized"
    stranger.close()
    wait_until(lambda: all(g["mem_used"] > 0 for g in node_row(cluster)["telemetry"]), 10,
               "the workers' memory in the node's telemetry")
    old_pids = [cluster.head.pid(f"workers:worker-0{gpu}") for gpu in (0, 1)]

    used = front.release()["usage_gpu_seconds"]
    # At once, while the released workers may still be exiting: the GPU's next job must get a
    # worker of its own, never the previous job's.
    cluster.client().call("set_device_flavor", {"flavor": "Small"})
    successor = fronts()
    assert successor.allocate()["state"] == "running"
    assert successor.hello()[0]["job_id"] == successor.job_id
    assert cluster.head.pid("workers:worker-00") not in old_pids
    wait_until(lambda: program_state(cluster.head, "workers:worker-01") == "STOPPED", 15, "worker 1 to stop")
    successor.release()
    wait_until(lambda: program_state(cluster.head, "workers:worker-00") == "STOPPED", 15, "worker 0 to stop")
    assert node_row(cluster)["free"] == 2 and cluster.head.agent().call("node_status")["workers"] == []
    records = cluster.client().call("usage")["records"]
    assert [(r["job_id"], r["gpus"]) for r in records] == [(job["job_id"], 2), (successor.job_id, 1)]
    assert records[0]["gpu_seconds"] == used > 0
    assert " lost " not in cluster.head.log("master"), "stopping workers never silences the agent"


def test_killed_worker_fails_its_job_with_the_reason_and_frees_the_gpus(cluster, fronts):
    front = fronts()
    job = front.allocate()
    front.hello()
    os.kill(cluster.head.pid("workers:worker-00"), signal.SIGKILL)

    seen = front.wait_state("failed", SETTLE_S)
    assert seen["message"] == "worker on node0:0 failed: worker process was killed by a signal"
    assert node_row(cluster)["free"] == 2
    assert cluster.head.agent().call("node_status")["workers"] == []
    assert [r["job_id"] for r in cluster.client().call("usage")["records"]] == [job["job_id"]]
    second = fronts()
    assert second.allocate()["state"] == "running" and second.status()["workers"][0]["gpu"] == 0


def test_killed_agent_comes_back_re_registers_and_re_adopts_its_workers(cluster, fronts):
    front = fronts()
    job = front.allocate()
    front.hello()
    old = cluster.head.pid("agent")
    os.kill(old, signal.SIGKILL)

    wait_until(lambda: program_state(cluster.head, "agent") == "RUNNING" and cluster.head.pid("agent") != old,
               30, "supervisord to restart the agent")
    wait_until(lambda: cluster.head.agent().call("node_status")["workers"], 10, "the new agent to serve")
    assert cluster.head.agent().call("node_status")["workers"] == [{"gpu": 0, "job_id": job["job_id"],
                                                                     "state": "running"}]
    readopted = f"re-adopted running worker of job {job['job_id']} on gpu 0"
    wait_until(lambda: "registered node node0" in cluster.head.log("agent").partition(readopted)[2], 10,
               "the new agent to register")
    assert node_row(cluster)["alive"] and front.status()["state"] == "running"
    assert front.hello()[0]["job_id"] == job["job_id"], "the worker served on through its agent's death"

    front.release()
    wait_until(lambda: program_state(cluster.head, "workers:worker-00") == "STOPPED", 15,
               "the new agent to stop the re-adopted worker")
    assert node_row(cluster)["alive"] and node_row(cluster)["free"] == 2


def test_agent_back_from_the_dead_has_its_stale_workers_stopped(cluster, fronts):
    front = fronts()
    front.allocate()
    agent = cluster.head.pid("agent")
    os.kill(agent, signal.SIGSTOP)
    try:
        failed = front.wait_state("failed", SETTLE_S)
        wait_until(lambda: "stop_worker job" in cluster.head.log("master"),
                   TEST_TIMINGS["agent_call_timeout_s"] + 5, "the master to give up on stopping the worker")
    finally:
        os.kill(agent, signal.SIGKILL)   # not resumed: the stop it was sent is lost for good
        os.kill(agent, signal.SIGCONT)
    assert failed["message"] == f"node node0 lost (no heartbeat for {TEST_TIMINGS['heartbeat_timeout_s']:g} s)"
    wait_until(lambda: node_row(cluster)["alive"], 30, "the restarted agent to bring the node back")
    wait_until(lambda: program_state(cluster.head, "workers:worker-00") == "STOPPED", 15,
               "the master to have the failed job's re-adopted worker stopped")
    successor = fronts()
    assert successor.allocate()["state"] == "running" and successor.status()["workers"][0]["gpu"] == 0
