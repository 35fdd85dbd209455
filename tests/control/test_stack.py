"""The whole control plane as users run it: moreh-smi against the real stack, jobs over two nodes,
queueing on a full cluster, and the faults that must lose nothing (master restart, a front that
dies); the embedded stack's own commands; SIGTERM ends every daemon cleanly."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons import embedded
from stack_front import fronts, new_token  # noqa: F401
from tests.cluster import TEST_TIMINGS, cluster_nodes, processes_with, wait_until

pytestmark = pytest.mark.timeout(180)

HEARTBEAT_TIMEOUT_S = TEST_TIMINGS["heartbeat_timeout_s"]


def smi(cluster, *args, fails: bool = False) -> str:
    """``moreh-smi ARGS`` as the cluster's user runs it: its output, or its one-line error."""
    result = cluster.run(sys.executable, "-m", "moreh_cli.smi", *args, timeout_s=60)
    assert result.returncode == (1 if fails else 0) and "Traceback" not in result.stderr, result.stderr
    return result.stderr if fails else result.stdout


def table_rows(out: str, header: str) -> list[list[str]]:
    """The cells of the table whose header row contains ``header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line) + 2
    rows = []
    for line in lines[start:]:
        if line.startswith("+"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_moreh_smi_shows_and_manages_the_real_stacks_devices(cluster, fronts):
    first = cluster.client().call("list_devices")["current_id"]
    assert re.search(r"Device (\d+) \(Medium\.128GB\) was added and is now the current device",
                     smi(cluster, "device", "--add", "2"))
    medium = cluster.client().call("list_devices")["current_id"]
    front = fronts()
    front.allocate()
    front.beat.memory_used = 300 * 1024 * 1024
    wait_until(lambda: cluster.client().call("list_processes")["processes"][0]["memory_mib"] == 300, 10,
               "the front's memory report")

    out = smi(cluster)
    devices = table_rows(out, "Total Memory")
    assert [d[:3] for d in devices] == [[f"{first}", "MoAI Accelerator", "Small.64GB"],
                                        [f"* {medium}", "MoAI Accelerator", "Medium.128GB"]]
    assert devices[1][3:5] == ["300 MiB", "131040 MiB"] and devices[0][3] == "-"
    assert table_rows(out, "Job ID") == [[str(medium), str(front.job_id), str(front.pid), "python train.py",
                                          "300 MiB"]]
    physical = table_rows(smi(cluster, "-p"), "Location")
    assert [g[:4] for g in physical] == [["0", "node0:0", "-", "-"], ["1", "node0:1", "-", "-"]]
    assert all(re.fullmatch(r"\d+ %", g[6]) for g in physical), "memory use of the real (virtual) GPUs"
    only_first = smi(cluster, "-i", str(first))
    assert [d[0] for d in table_rows(only_first, "Total Memory")] == [str(first)]
    assert table_rows(only_first, "Job ID") == []

    assert f"device {medium} has a running process" in smi(cluster, "device", "--rm", str(medium), fails=True)
    assert f"Switched to device {first}." in smi(cluster, "device", "--switch", str(first))
    front.release()
    removed = smi(cluster, "device", "--rm", str(medium))
    assert f"Removed device(s): {medium}. Current device: {first}." in removed
    assert table_rows(smi(cluster), "Job ID") == []


@pytest.mark.cluster(nodes=2)
def test_a_device_larger_than_a_node_spans_both_and_smaller_ones_pack(cluster, fronts):
    large = fronts(new_token(cluster, "large", "Large"))
    assert large.allocate()["message"] == "running on 4 GPUs (node0, node1)"
    workers = large.status()["workers"]
    assert [(w["rank"], w["node"], w["gpu"]) for w in workers] == [(0, "node0", 0), (1, "node0", 1),
                                                                   (2, "node1", 0), (3, "node1", 1)]
    assert len({w["address"] for w in workers}) == 4
    for node in cluster.nodes:
        assert [node.program(f"workers:worker-0{g}")["statename"] for g in (0, 1)] == ["RUNNING"] * 2
        assert [w["job_id"] for w in node.agent().call("node_status")["workers"]] == [large.job_id] * 2
    large.release()

    small, medium = fronts(new_token(cluster, "small")), fronts(new_token(cluster, "medium", "Medium"))
    small.allocate()
    medium.allocate()
    [used] = small.status()["workers"]
    assert {w["node"] for w in medium.status()["workers"]} == {"node0", "node1"} - {used["node"]}, \
        "a job that fits one node gets one whole node"
    small.release()
    medium.release()
    usage = {f.job_id: cluster.client(f.token).call("usage")["records"] for f in (large, small, medium)}
    assert {job: [r["gpus"] for r in records] for job, records in usage.items()} == {
        large.job_id: [4], small.job_id: [1], medium.job_id: [2]}


def test_full_cluster_queues_with_a_clear_message_and_runs_when_freed(cluster, fronts):
    holder = fronts(new_token(cluster, "holder", "Medium"))
    holder.allocate()
    waiting = fronts(new_token(cluster, "waiting"))
    reply = waiting.allocate()
    assert reply["state"] == "queued"
    assert reply["message"] == "waiting for 1 GPU (0 free of 2); position 1 in queue"
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.5)
    assert waiting.status()["state"] == "queued", "a waiting front that keeps polling keeps its place"

    holder.release()
    status = waiting.wait_state("running", 30)
    assert status["message"] == "running on 1 GPU (node0)"
    assert cluster.head.agent().call("node_status")["workers"][0]["job_id"] == waiting.job_id


def test_dead_front_is_freed_after_the_heartbeat_timeout_and_billed(cluster, fronts):
    front = fronts()
    front.allocate()
    front.die()
    failed = wait_until(lambda: (s := front.status())["state"] == "failed" and s, HEARTBEAT_TIMEOUT_S + 10,
                        "the silent front's job to fail")
    assert failed["message"] == \
        f"front process {front.pid} on front stopped (no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s)"
    wait_until(lambda: cluster.head.program("workers:worker-00")["statename"] == "STOPPED", 15,
               "its worker to stop")
    assert cluster.nodes_alive() == {"node0": True}
    [record] = cluster.client().call("usage")["records"]
    assert record["job_id"] == front.job_id and record["gpu_seconds"] >= HEARTBEAT_TIMEOUT_S


TELEMETRY = ("utilization", "used_mib")  # live readings from the agent, not stored state


def without_telemetry(view: dict) -> dict:
    return {**view, "devices": [{k: v for k, v in d.items() if k not in TELEMETRY}
                                for d in view.get("devices", [])]}


def test_master_killed_is_restarted_and_loses_nothing(cluster, fronts):
    done = fronts()
    done.allocate()
    done.release()
    live = fronts()
    live.allocate()
    views = ("list_devices", "usage", "list_processes")
    before = {v: without_telemetry(cluster.client().call(v)) for v in views}
    jobs_before = cluster.admin.call("list_all_jobs")
    old = cluster.head.pid("master")
    os.kill(old, signal.SIGKILL)

    wait_until(lambda: cluster.head.program("master")["statename"] == "RUNNING"
               and cluster.head.pid("master") != old, 30, "supervisord to restart the master")
    assert {v: without_telemetry(cluster.client().call(v)) for v in views} == before
    assert cluster.admin.call("list_all_jobs") == jobs_before
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.5)   # heartbeats from the agent and the front reach the new master
    assert cluster.nodes_alive() == {"node0": True} and live.status()["state"] == "running"
    assert live.hello()[0]["job_id"] == live.job_id, "the data plane never noticed"
    live.release()
    wait_until(lambda: cluster.head.program("workers:worker-00")["statename"] == "STOPPED", 15,
               "the restarted master to stop the worker through the agent")


def test_sigterm_ends_every_daemon_cleanly(cluster, fronts):
    front = fronts()
    front.allocate()
    front.hello()
    for program, log in (("workers:worker-00", "worker-00"), ("agent", "agent"), ("master", "master")):
        cluster.supervisor.supervisor.stopProcess(program)   # supervisord's stopsignal is TERM
        info = cluster.head.program(program)
        assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), program
        assert "stopped" in cluster.head.log(log).splitlines()[-1], program


def embedded_cli(node, command: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemons.embedded", command], env=node.env,
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_embedded_stack_does_not_live_in_the_directory_it_was_started_from(tmp_path):
    """A checkout removed under a running stack must not take its workers with it (they failed
    to load torch from a deleted working directory)."""
    [node] = cluster_nodes(tmp_path)
    launched_from = tmp_path / "checkout"
    launched_from.mkdir()
    try:
        assert embedded_cli(node, "up", cwd=launched_from).returncode == 0
        supervisord = int(node.settings.path("state_dir").joinpath("supervisord.pid").read_text())
        state_dir = node.settings.path("state_dir").resolve()
        for pid in (supervisord, node.pid("master"), node.pid("agent")):
            assert Path(f"/proc/{pid}/cwd").resolve() == state_dir
    finally:
        embedded.stop(node.settings)
        embedded.terminate(processes_with(node.config_path), 10)


def test_embedded_up_status_down_leave_nothing_behind_even_after_a_crash(tmp_path):
    [node] = cluster_nodes(tmp_path)
    try:
        up = embedded_cli(node, "up")
        assert up.returncode == 0 and "embedded cluster up" in up.stdout, up.stderr
        assert node.settings.path("token_file").read_text().strip()
        status = embedded_cli(node, "status")
        assert status.returncode == 0 and re.search(r"master\s+RUNNING", status.stdout) \
            and re.search(r"agent\s+RUNNING", status.stdout), status.stdout
        assert "embedded cluster stopped" in embedded_cli(node, "down").stdout
        assert processes_with(node.config_path) == []
        assert "not running" in embedded_cli(node, "down").stdout

        assert embedded_cli(node, "up").returncode == 0
        survivors = [node.pid("master"), node.pid("agent")]
        os.kill(int(node.settings.path("state_dir").joinpath("supervisord.pid").read_text()), signal.SIGKILL)
        wait_until(lambda: not embedded.supervisor_running(node.settings), 10, "supervisord to die")
        assert sorted(embedded.stack_pids(node.settings)) == sorted(survivors), "its daemons outlive it"
        status = embedded_cli(node, "status")
        assert status.returncode == 3 and "2 of its processes outlived a crash" in status.stdout
        up = embedded_cli(node, "up")
        assert up.returncode == 0 and "leftover processes" in up.stdout, up.stderr
        assert not set(survivors) & set(processes_with(node.config_path))

        os.kill(int(node.settings.path("state_dir").joinpath("supervisord.pid").read_text()), signal.SIGKILL)
        assert "embedded cluster stopped" in embedded_cli(node, "down").stdout
        assert processes_with(node.config_path) == []
    finally:
        embedded.stop(node.settings)
        embedded.terminate(processes_with(node.config_path), 10)
