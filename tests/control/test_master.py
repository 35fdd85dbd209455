"""The master daemon against real clients: tokens, devices, jobs, queue, liveness, restart."""
import signal
import sqlite3
import time
from contextlib import contextmanager

import pytest

from daemons import wire
from daemons.master import store as store_module
from daemons.master.store import Store
from master_fixture import (CLUSTER_SECRET, HEARTBEAT_TIMEOUT_S, FakeNode, FrontHeartbeat, FrontHeartbeats,  # noqa: F401
                            MasterProcess, make_node, master, wait_until)

pytestmark = pytest.mark.timeout(120)


def error_of(client, msg_type, body=None) -> wire.RemoteError:
    with pytest.raises(wire.RemoteError) as info:
        client.call(msg_type, body or {})
    return info.value


def events(master) -> list[tuple[str, str, str]]:
    return [(e["kind"], e["subject"], e["message"]) for e in master.admin().call("list_events")["events"]]


@contextmanager
def alice_and_bob_allocate(master):
    """Two users, each with a client and a job asked for (alice's first), whose fronts heartbeat
    until the block ends: ``((token, client, job), (token, client, job))``."""
    users = []
    for name in ("alice", "bob"):
        token = master.create_token(name)
        client = master.client(token)
        users.append((token, client, allocate(client)))
    with FrontHeartbeats(master, *((token, job["job_id"]) for token, _, job in users)):
        yield users


def allocate(client, pid=1234):
    return client.call("allocate_job", {"pid": pid, "process_name": "python train.py", "hostname": "front1"})


def job_state(client, job_id):
    return client.call("job_status", {"job_id": job_id})["state"]


@pytest.fixture
def user(master):
    token = master.create_token("alice")
    client = master.client(token)
    yield token, client
    client.close()


def test_hello_names_version_and_protocol(master):
    reply = master.client(None).call("hello")
    assert reply["protocol"] == wire.PROTOCOL_VERSION and reply["server_version"]


def test_no_token_starts_with_a_dash(master):
    """A token is typed after ``--token`` on command lines, where a leading '-' reads as an
    option (argparse: "expected one argument"). URL-safe tokens began with one 1 time in 64:
    500 tokens had one with a probability of 1 - (63/64)**500, over 99.9%."""
    tokens = [master.create_token(f"u{i}") for i in range(500)]
    assert len(set(tokens)) == 500
    assert [t for t in tokens if t.startswith("-")] == []


def test_tokens_are_authenticated_and_isolated(master, make_node):
    make_node("n1", 2)
    assert error_of(master.client(None), "list_devices").code == "unauthorized"
    assert error_of(master.client("forged"), "list_devices").code == "unauthorized"
    assert error_of(master.client("forged"), "create_token", {"user": "x"}).code == "unauthorized"
    alice, bob = master.create_token("alice"), master.create_token("bob")
    a, b = master.client(alice), master.client(bob)
    a_dev = a.call("list_devices")
    assert [d["flavor"] for d in a_dev["devices"]] == ["Small.64GB"] and a_dev["devices"][0]["current"]
    a_id = a_dev["current_id"]
    job = allocate(a)
    assert job["state"] == "running"
    for msg_type, body in [("switch_device", {"device_id": a_id}), ("remove_device", {"device_id": a_id}),
                           ("set_device_flavor", {"flavor": 2, "device_id": a_id}),
                           ("job_status", {"job_id": job["job_id"]}), ("release_job", {"job_id": job["job_id"]}),
                           ("list_processes", {"device_id": a_id})]:
        assert error_of(b, msg_type, body).code == "not_found", msg_type
    assert a_id not in [d["id"] for d in b.call("list_devices")["devices"]]
    assert b.call("list_processes")["processes"] == []
    assert job_state(a, job["job_id"]) == "running"


def test_device_add_limit_remove_and_switch(user, master):
    _, c = user
    first = c.call("list_devices")["current_id"]
    added = [c.call("add_device", {"flavor": f})["device"] for f in (3, "Medium", "xLarge.512GB")]
    assert [d["flavor"] for d in added] == ["Large.256GB", "Medium.128GB", "xLarge.512GB"]
    assert c.call("list_devices")["current_id"] == added[-1]["id"], "a new device becomes current"
    err = error_of(c, "add_device", {"flavor": 1})
    assert err.code == "device_limit"
    assert "already owns 4 devices" in err.message and "moreh-smi device --rm ID" in err.message
    assert error_of(c, "add_device", {"flavor": 13}).code == "bad_request"
    # switching records use; removing the current device falls back to the most recently used one
    c.call("switch_device", {"device_id": added[0]["id"]})
    c.call("switch_device", {"device_id": first})
    assert c.call("remove_device", {"device_id": first})["current_id"] == added[0]["id"]
    reply = c.call("remove_device", {"all": True})
    assert sorted(reply["removed"]) == sorted(d["id"] for d in added) and reply["current_id"] is None
    assert c.call("list_devices")["devices"] == []
    assert error_of(c, "allocate_job", {"pid": 1, "process_name": "p", "hostname": "h"}).code == "no_device"


def test_job_gets_flavor_gpus_and_agents_get_the_launch(user, master, make_node):
    token, c = user
    node = make_node("n1", 4)
    c.call("set_device_flavor", {"flavor": "Medium"})
    job = allocate(c)
    assert job["state"] == "running"
    status = c.call("job_status", {"job_id": job["job_id"]})
    assert status["world_size"] == 2
    assert [(w["rank"], w["node"]) for w in status["workers"]] == [(0, "n1"), (1, "n1")]
    assert [w["address"] for w in status["workers"]] == [f"tcp://127.0.0.1:{5700 + w['gpu']}"
                                                         for w in status["workers"]]
    rank0 = status["workers"][0]
    assert status["rendezvous"] == f"tcp://127.0.0.1:{5700 + 100 + rank0['gpu']}"
    assert sorted(l["rank"] for l in node.launched) == [0, 1]
    assert all(l["job_secret"] == status["job_secret"] and l["world_size"] == 2 and l["memory_cap"] == 2 << 30
               for l in node.launched)
    # the size switch applies to the next job
    c.call("set_device_flavor", {"flavor": "Large"})
    c.call("release_job", {"job_id": job["job_id"], "exit_code": 0})
    assert job_state(c, job["job_id"]) == "finished"
    wait_until(lambda: len(node.stopped) == 2, 5, "stop_worker for both workers")
    assert c.call("job_status", {"job_id": allocate(c)["job_id"]})["world_size"] == 4


def test_job_queues_when_gpus_are_short_and_runs_once_freed(master, make_node):
    make_node("n1", 2)
    alice, bob = master.create_token("alice"), master.create_token("bob")
    a, b = master.client(alice), master.client(bob)
    for c in (a, b):
        c.call("set_device_flavor", {"flavor": "Medium"})
    first = allocate(a)
    assert first["state"] == "running"
    second = allocate(b)
    assert second["state"] == "queued"
    assert second["message"] == "waiting for 2 GPUs (0 free of 2); position 1 in queue"
    beat = FrontHeartbeat(master, alice, first["job_id"])
    time.sleep(0.5)  # the queued front only polls; polling keeps it alive
    assert job_state(b, second["job_id"]) == "queued"
    beat.stop()
    usage = a.call("release_job", {"job_id": first["job_id"]})["usage_gpu_seconds"]
    assert usage > 0
    wait_until(lambda: job_state(b, second["job_id"]) == "running", 10, "the queued job to start")
    records = a.call("usage")
    assert records["records"][0]["job_id"] == first["job_id"] and records["records"][0]["gpus"] == 2
    assert records["total_gpu_seconds"] == pytest.approx(usage)


def test_request_larger_than_the_cluster_is_refused(user, make_node):
    _, c = user
    make_node("n1", 2)
    c.call("set_device_flavor", {"flavor": "xLarge"})
    err = error_of(c, "allocate_job", {"pid": 1, "process_name": "p", "hostname": "h"})
    assert err.code == "too_large" and "needs 8 GPUs" in err.message and "has 2" in err.message


def test_silent_front_frees_gpus_and_records_usage(user, master, make_node):
    token, c = user
    node = make_node("n1", 1)
    job = allocate(c)
    beat = FrontHeartbeat(master, token, job["job_id"], memory_used=300 << 20)
    wait_until(lambda: [p["memory_mib"] for p in c.call("list_processes")["processes"]] == [300], 5,
               "the process and its memory to appear")
    beat.stop()
    wait_until(lambda: job_state(c, job["job_id"]) == "failed", HEARTBEAT_TIMEOUT_S + 5, "the job to fail")
    status = c.call("job_status", {"job_id": job["job_id"]})
    assert "no heartbeat" in status["message"] and "front process 1234" in status["message"]
    wait_until(lambda: node.stopped, 5, "stop_worker")
    usage = c.call("usage")
    assert usage["records"][0]["gpu_seconds"] >= HEARTBEAT_TIMEOUT_S
    assert allocate(c)["state"] == "running", "the GPU is free again"


def test_lost_node_leaves_the_pool_and_fails_its_jobs(user, master, make_node):
    token, c = user
    a = make_node("a", 1)
    make_node("b", 2)
    job = allocate(c)
    assert c.call("job_status", {"job_id": job["job_id"]})["workers"][0]["node"] == "a", "packs the fullest fit"
    beat = FrontHeartbeat(master, token, job["job_id"])
    a.stop_heartbeats()
    wait_until(lambda: job_state(c, job["job_id"]) == "failed", HEARTBEAT_TIMEOUT_S + 5, "the job to fail")
    beat.stop()
    assert c.call("job_status", {"job_id": job["job_id"]})["message"] == \
        f"node a lost (no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s)"
    nodes = {n["node"]: n for n in master.admin().call("list_nodes")["nodes"]}
    assert not nodes["a"]["alive"] and nodes["a"]["free"] == 0 and nodes["b"]["alive"]
    c.call("set_device_flavor", {"flavor": "Medium"})
    status = c.call("job_status", {"job_id": allocate(c)["job_id"]})
    assert {w["node"] for w in status["workers"]} == {"b"}
    a.start_heartbeats()  # the node comes back: its heartbeats make it live again
    wait_until(lambda: {n["node"]: n for n in master.admin().call("list_nodes")["nodes"]}["a"]["alive"], 5,
               "node a to be live again")
    assert events(master) == [("node_up", "a", "registered with 1 GPU"), ("node_up", "b", "registered with 2 GPUs"),
                              ("node_lost", "a", f"node a lost (no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s)"),
                              ("node_up", "a", "heartbeats again after it was lost")]


def test_failed_launch_fails_the_job_and_frees_gpus(user, make_node):
    _, c = user
    make_node("n1", 1, fail_launch=True)
    job = allocate(c)
    assert job["state"] == "failed" and "launch failed" in job["message"]
    assert "supervisor refused" in job["message"]
    assert c.call("usage")["records"][0]["job_id"] == job["job_id"]


def test_worker_exit_fails_the_job_with_the_reason(user, master, make_node):
    _, c = user
    make_node("n1", 1)
    job = allocate(c)
    gpu = c.call("job_status", {"job_id": job["job_id"]})["workers"][0]["gpu"]
    master.admin().call("report_worker_exit", {"node": "n1", "gpu": gpu, "job_id": job["job_id"],
                                               "exit_code": -9, "reason": "killed by the OOM killer"})
    status = c.call("job_status", {"job_id": job["job_id"]})
    assert status["state"] == "failed" and "killed by the OOM killer" in status["message"]
    assert events(master)[-1] == ("worker_failed", f"n1:{gpu}", f"job {job['job_id']}: killed by the OOM killer")


def test_workers_no_live_job_holds_are_stopped_through_their_agent(user, make_node):
    _, c = user
    node = make_node("n1", 2)
    live = allocate(c)
    gpu = c.call("job_status", {"job_id": live["job_id"]})["workers"][0]["gpu"]
    node.workers = [{"gpu": gpu, "job_id": live["job_id"], "state": "running"},
                    {"gpu": 1 - gpu, "job_id": 999, "state": "running"}]
    wait_until(lambda: {"job_id": 999, "gpu": 1 - gpu} in node.stopped, 5, "the stray worker to be stopped")
    assert all(s["job_id"] == 999 for s in node.stopped), "a live job's worker is left alone"


def test_sigterm_stops_the_master_at_once_while_a_launch_waits_for_its_worker(tmp_path):
    """A launch may wait a minute for its worker to start, and supervisord waits 10 s for the
    master to stop before it kills it."""
    master = MasterProcess(tmp_path, agent_call_timeout_s=30.0, worker_start_timeout_s=30.0)
    master.start()
    node = FakeNode(master, "n1", 1, launch_hangs=True)
    front = master.client(master.create_token("alice"))
    try:
        node.register()
        front.send("allocate_job", {"pid": 1234, "process_name": "python train.py", "hostname": "front1"})
        wait_until(lambda: node.asked_to_launch, 5, "the launch to reach the agent")
        asked_to_stop = time.monotonic()
        master.kill(signal.SIGTERM)
        assert master.proc.returncode == 0 and time.monotonic() - asked_to_stop < 5
        assert master.log.read_text().splitlines()[-1].endswith("master stopped")
    finally:
        front.close()
        node.close()
        master.stop()


def test_master_killed_and_restarted_loses_nothing(master, make_node):
    node = make_node("n1", 4)
    alice = master.create_token("alice")
    c = master.client(alice)
    extra = c.call("add_device", {"flavor": "Medium"})["device"]["id"]
    done = allocate(c)
    c.call("release_job", {"job_id": done["job_id"]})
    live = allocate(c)
    beat = FrontHeartbeat(master, alice, live["job_id"], memory_used=5 << 20)
    wait_until(lambda: c.call("list_devices")["devices"][-1]["used_mib"] == 5, 5, "memory to be reported")
    before = {t: c.call(t) for t in ("list_devices", "usage", "list_processes")}
    jobs_before = master.admin().call("list_all_jobs")

    master.kill()
    master.start()
    after = {t: c.call(t) for t in ("list_devices", "usage", "list_processes")}
    assert after == before
    assert master.admin().call("list_all_jobs") == jobs_before
    assert c.call("list_devices")["current_id"] == extra
    assert job_state(c, live["job_id"]) == "running"
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.5)  # the restarted master keeps the live job and the node
    assert job_state(c, live["job_id"]) == "running"
    assert master.admin().call("list_nodes")["nodes"][0]["alive"]
    beat.stop()
    assert node.launched


def test_revoked_token_is_refused_and_its_jobs_end_with_their_usage_kept(master, make_node):
    node = make_node("n1", 2)
    admin = master.admin()
    with alice_and_bob_allocate(master) as ((alice, a, a_job), (bob, b, b_job)):
        reply = admin.call("revoke_token", {"token": alice})
        assert reply["user"] == "alice" and reply["ended_jobs"] == [a_job["job_id"]] and reply["revoked"]
        assert events(master)[-1] == ("token_revoked", "alice", f"jobs ended: {a_job['job_id']}")
        a_worker = next(l["gpu"] for l in node.launched if l["job_id"] == a_job["job_id"])
        wait_until(lambda: {"job_id": a_job["job_id"], "gpu": a_worker} in node.stopped, 5,
                   "stop_worker for the revoked token's worker")
        for msg_type, body in [("list_devices", {}), ("job_status", {"job_id": a_job["job_id"]}),
                               ("allocate_job", {"pid": 1, "process_name": "p", "hostname": "h"})]:
            err = error_of(a, msg_type, body)
            assert err.code == "unauthorized" and "revoked by the cluster's administrator" in err.message, err
        assert job_state(b, b_job["job_id"]) == "running", "another token's job goes on"
        ended = next(j for j in admin.call("list_all_jobs")["jobs"] if j["job_id"] == a_job["job_id"])
        assert ended["state"] == "failed" and "revoked" in ended["message"]
        usage = {t["user"]: t for t in admin.call("list_usage")["tokens"]}
        assert usage["alice"]["jobs"] == 1 and usage["alice"]["gpu_seconds"] > 0, "billing keeps it"
        assert allocate(master.client(master.create_token("carol")))["state"] == "running", "its GPU is free"
        # Idempotent, kept across a restart, and an unknown token is named as such.
        assert admin.call("revoke_token", {"token": alice})["ended_jobs"] == []
        assert error_of(admin, "revoke_token", {"token": "no-such"}).code == "not_found"
        master.kill()
        master.start()
        assert error_of(master.client(alice), "list_devices").code == "unauthorized"
        listed = {t["user"]: t for t in master.admin().call("list_tokens")["tokens"]}
        assert listed["alice"]["revoked"] == reply["revoked"] and listed["bob"]["revoked"] is None
        assert listed["bob"]["active_jobs"] == 1 and listed["bob"]["devices"] == 1


def test_the_operator_ends_a_job_and_its_gpus_return_to_the_pool(master, make_node):
    node = make_node("n1", 1)
    admin = master.admin()
    with alice_and_bob_allocate(master) as ((_, a, running), (_, b, queued)):
        assert queued["state"] == "queued"
        reply = admin.call("end_job", {"job_id": running["job_id"]})
        assert reply["job_id"] == running["job_id"] and reply["user"] == "alice" and reply["gpu_seconds"] > 0
        status = a.call("job_status", {"job_id": running["job_id"]})
        assert (status["state"], status["message"]) == ("failed", "ended by the cluster's administrator")
        wait_until(lambda: {"job_id": running["job_id"], "gpu": 0} in node.stopped, 5, "stop_worker")
        wait_until(lambda: job_state(b, queued["job_id"]) == "running", 5, "the queued job to get the GPU")
        err = error_of(admin, "end_job", {"job_id": running["job_id"]})
        assert err.code == "not_active" and "already failed: ended by the cluster's administrator" in err.message
        assert error_of(admin, "end_job", {"job_id": 999}).code == "not_found"
        assert a.call("usage")["records"][0]["job_id"] == running["job_id"], "billed up to its end"
        assert events(master)[-1] == ("job_ended", f"job {running['job_id']}", "of alice, by the administrator")


def test_a_token_limited_to_fewer_gpus_cannot_pick_or_run_a_larger_device(master, make_node):
    make_node("n1", 8)
    alice = master.create_token("alice")
    a, admin = master.client(alice), master.admin()
    a.call("set_device_flavor", {"flavor": "Large"})  # 4 GPUs, chosen before the limit
    assert admin.call("limit_token", {"token": alice, "max_gpus": 2}) == {"user": "alice", "max_gpus": 2}
    device = a.call("list_devices")["current_id"]
    err = error_of(a, "allocate_job", {"pid": 1, "process_name": "p", "hostname": "h"})
    assert err.code == "gpu_limit"
    assert err.message == (f"device {device} (Large.256GB) needs 4 GPUs but this token may use at most "
                           "2 GPUs; pick a smaller size with `moreh-switch-model`")
    assert error_of(a, "set_device_flavor", {"flavor": "xLarge"}).code == "gpu_limit"
    assert error_of(a, "add_device", {"flavor": 3}).code == "gpu_limit"
    assert a.call("set_device_flavor", {"flavor": "Medium"})["device"]["flavor"] == "Medium.128GB"
    job = allocate(a)
    assert job["state"] == "running" and a.call("job_status", {"job_id": job["job_id"]})["world_size"] == 2
    a.call("release_job", {"job_id": job["job_id"]})
    assert {t["user"]: t["max_gpus"] for t in admin.call("list_tokens")["tokens"]} == {"alice": 2}
    admin.call("limit_token", {"token": alice, "max_gpus": None})
    assert events(master)[-2:] == [("token_limited", "alice", "at most 2 GPUs"), ("token_limited", "alice", "no limit")]
    assert a.call("set_device_flavor", {"flavor": "xLarge"})["device"]["flavor"] == "xLarge.512GB"
    assert error_of(admin, "limit_token", {"token": alice, "max_gpus": 0}).code == "bad_request"
    assert error_of(admin, "limit_token", {"token": "nope", "max_gpus": 1}).code == "not_found"


def test_a_drained_node_takes_no_new_job_and_its_running_jobs_go_on(master, make_node):
    make_node("n1", 1)
    n2 = make_node("n2", 1)
    admin = master.admin()
    alice, bob = master.create_token("alice"), master.create_token("bob")
    a, b = master.client(alice), master.client(bob)
    running = allocate(a)
    with FrontHeartbeats(master, (alice, running["job_id"])) as beats:
        on = a.call("job_status", {"job_id": running["job_id"]})["workers"][0]["node"]
        other = "n2" if on == "n1" else "n1"
        assert admin.call("drain_node", {"node": on})["running_jobs"] == [running["job_id"]]
        assert admin.call("drain_node", {"node": other}) == {"node": other, "gpu": None, "drained": True,
                                                             "running_jobs": []}
        waiting = allocate(b)
        beats.add(bob, waiting["job_id"])
        assert waiting["state"] == "queued", "both nodes drained: the free GPU is not handed out"
        assert waiting["message"] == "waiting for 1 GPU (0 free of 2); position 1 in queue"
        nodes = {n["node"]: n for n in admin.call("list_nodes")["nodes"]}
        assert nodes[other]["drained"] and nodes[other]["free"] == 0
        n2.register()  # an agent restarting re-registers its node: the operator's drain stays
        assert {n["node"]: n for n in admin.call("list_nodes")["nodes"]}["n2"]["drained"]
        assert job_state(a, running["job_id"]) == "running", "a drained node's job goes on"
        assert admin.call("drain_node", {"node": other, "drained": False})["drained"] is False
        assert events(master)[-3:] == [("drained", on, "no new job is placed on it"),
                                       ("drained", other, "no new job is placed on it"),
                                       ("undrained", other, "takes new jobs again")]
        wait_until(lambda: job_state(b, waiting["job_id"]) == "running", 5, "the queued job to start")
        assert b.call("job_status", {"job_id": waiting["job_id"]})["workers"][0]["node"] == other
        assert error_of(admin, "drain_node", {"node": "n9"}).code == "not_found"


def test_one_drained_gpu_takes_no_new_job_and_the_others_do(master, make_node):
    make_node("n1", 2)
    admin = master.admin()
    alice = master.create_token("alice")
    a = master.client(alice)
    reply = admin.call("drain_node", {"node": "n1", "gpu": 0})
    assert reply == {"node": "n1", "gpu": 0, "drained": True, "running_jobs": []}
    [shown] = admin.call("list_nodes")["nodes"]
    assert (shown["drained"], shown["drained_gpus"], shown["free"]) == (False, [0], 1)
    job = allocate(a)
    with FrontHeartbeats(master, (alice, job["job_id"])):
        assert a.call("job_status", {"job_id": job["job_id"]})["workers"][0]["gpu"] == 1
        assert admin.call("drain_node", {"node": "n1", "gpu": 1})["running_jobs"] == [job["job_id"]]
        assert admin.call("drain_node", {"node": "n1", "gpu": 0, "drained": False})["drained"] is False
        assert admin.call("list_nodes")["nodes"][0]["drained_gpus"] == [1]
        assert events(master)[-3:] == [("drained", "n1:0", "no new job is placed on it"),
                                       ("drained", "n1:1", "no new job is placed on it"),
                                       ("undrained", "n1:0", "takes new jobs again")]
        one_gpu = admin.call("list_events", {"subject": "n1:0"})["events"]
        assert [(e["kind"], e["subject"]) for e in one_gpu] == [("drained", "n1:0"), ("undrained", "n1:0")]
        node_wide = admin.call("list_events", {"subject": "n1", "limit": 2})["events"]
        assert [e["subject"] for e in node_wide] == ["n1:1", "n1:0"], "the node's newest, its GPUs' too"
        assert admin.call("list_events", {"subject": "n"})["events"] == [], "a whole name, not a prefix"
        assert error_of(admin, "drain_node", {"node": "n1", "gpu": 5}).code == "not_found"


def test_a_gpu_with_a_fault_gets_no_new_job_and_a_lost_gpu_fails_its_job(master, make_node):
    node = make_node("n1", 2)
    alice, bob = master.create_token("alice"), master.create_token("bob")
    a, b = master.client(alice), master.client(bob)
    admin = master.admin()

    def free():
        return admin.call("list_nodes")["nodes"][0]["free"]

    node.faults[0] = ("over temperature: 93 C, slowdown at 90 C", False)
    wait_until(lambda: free() == 1, 5, "the next heartbeat to report the hot GPU")
    hot = allocate(a)
    with FrontHeartbeats(master, (alice, hot["job_id"])) as beats:
        assert a.call("job_status", {"job_id": hot["job_id"]})["workers"][0]["gpu"] == 1, "not the hot GPU"
        queued = allocate(b)
        beats.add(bob, queued["job_id"])
        assert queued["message"] == "waiting for 1 GPU (0 free of 2); position 1 in queue"
        shown = admin.call("list_nodes")["nodes"][0]["telemetry"][0]
        assert shown["fault"] == "over temperature: 93 C, slowdown at 90 C" and not shown["lost"]
        del node.faults[0]  # cooled down: back in the pool, and the queue is served
        wait_until(lambda: job_state(b, queued["job_id"]) == "running", 5, "the queued job to start")

        node.faults[1] = ("NVML cannot read the GPU: GPU is lost", True)
        wait_until(lambda: job_state(a, hot["job_id"]) == "failed", 5, "the lost GPU's job to fail")
        message = a.call("job_status", {"job_id": hot["job_id"]})["message"]
        assert message == "GPU n1:1 failed: NVML cannot read the GPU: GPU is lost", message
        assert job_state(b, queued["job_id"]) == "running", "the other GPU's job goes on"
        wait_until(lambda: {"job_id": hot["job_id"], "gpu": 1} in node.stopped, 5, "stop_worker")
        assert free() == 0, "a lost GPU takes no new job"  # the heartbeat that failed the job said so
        log = master.log.read_text()
        assert "node n1 GPU 0: over temperature" in log and "node n1 GPU 0 has no fault any more" in log
        assert events(master)[1:] == [
            ("gpu_fault", "n1:0", "over temperature: 93 C, slowdown at 90 C"),
            ("gpu_ok", "n1:0", "no fault any more (was: over temperature: 93 C, slowdown at 90 C)"),
            ("gpu_fault", "n1:1", "NVML cannot read the GPU: GPU is lost")]


def test_telemetry_entries_that_name_no_gpu_are_dropped(master, make_node):
    node = make_node("n1", 1)
    node.stop_heartbeats()
    admin = master.admin()
    admin.call("heartbeat_node", {"node": "n1", "gpus": [{"index": [0], "fault": "x"}, "hot", {"index": "0"},
                                                         {"index": 0, "fault": None, "temp_c": 50}]})
    [shown] = admin.call("list_nodes")["nodes"]
    assert [g["temp_c"] for g in shown["telemetry"]] == [50] and shown["free"] == 1


def test_a_database_from_before_the_operator_controls_opens_with_its_records(tmp_path):
    """A master upgraded in place opens the database the old one wrote: the columns added since
    (tokens.revoked, tokens.max_gpus, nodes.drained, nodes.drained_gpus) are added to it, and no row
    is lost."""
    old = sqlite3.connect(tmp_path / "master.db")
    old.executescript(
        "CREATE TABLE tokens (token TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL,"
        " current_device INTEGER);"
        "CREATE TABLE nodes (name TEXT PRIMARY KEY, agent_addr TEXT NOT NULL, worker_host TEXT NOT NULL,"
        " worker_port_base INTEGER NOT NULL, gpus TEXT NOT NULL, telemetry TEXT NOT NULL,"
        " registered REAL NOT NULL, last_seen REAL NOT NULL, alive INTEGER NOT NULL);"
        "INSERT INTO tokens VALUES ('t0k3n', 'dave', 1.0, NULL);"
        "INSERT INTO nodes VALUES ('n1', 'tcp://a', 'h', 5700, '[]', '[]', 1.0, 1.0, 1);")
    old.commit()
    old.close()
    store = Store(tmp_path / "master.db")
    try:
        old_token = store.token("t0k3n")
        assert (old_token["user"], old_token["revoked"], old_token["max_gpus"]) == ("dave", None, None)
        assert store.node("n1")["drained"] == 0 and store.node("n1")["drained_gpus"] == []
        with store.tx():
            store.revoke_token("t0k3n", 2.0)
            store.set_node_drained("n1", True)
        assert store.token("t0k3n")["revoked"] == 2.0 and store.node("n1")["drained"] == 1
    finally:
        store.close()
    Store(tmp_path / "master.db").close()  # opening it again adds nothing twice


BAD_CLIENT_REQUESTS = [
    ("add_device", {"flavor": [1]}), ("add_device", {}), ("switch_device", {"device_id": "x"}),
    ("allocate_job", {"pid": "1", "process_name": "p", "hostname": "h"}),
    ("allocate_job", {"pid": 2 ** 63, "process_name": "p", "hostname": "h"}),
    ("allocate_job", {"pid": 1, "process_name": "p" * 5000, "hostname": "h"}),
    ("heartbeat_job", {"job_id": True}), ("list_devices", [1, 2]), ("remove_device", {"all": "yes"}),
    ("job_status", {"job_id": None}), ("set_device_flavor", {"flavor": "Huge"}),
]
BAD_CLUSTER_REQUESTS = [
    ("register_node", {"node": "x", "agent_addr": "a", "worker_host": "h", "gpus": [{"index": "0"}]}),
    ("register_node", {"node": "x", "agent_addr": "a", "worker_host": "h", "gpus": [{"index": 0}, {"index": 0}]}),
    ("register_node", {"node": "x", "agent_addr": "a", "worker_host": "h", "gpus": "four"}),
    ("heartbeat_node", {"node": 5}), ("create_token", {"user": ""}), ("report_worker_exit", {"job_id": "1"}),
    ("list_nodes", "x"), ("revoke_token", {"token": 7}), ("drain_node", {"node": "n1", "drained": "no"}),
    ("end_job", {"job_id": "1"}), ("limit_token", {"token": "t", "max_gpus": 1.5}), ("list_events", {"limit": 0}),
    ("backup_db", {"path": 7}), ("backup_db", {}), ("list_events", {"subject": 1}),
]


def test_wrong_field_types_are_bad_requests_and_lose_nothing(user, master):
    _, c = user
    admin = master.admin()
    for client, cases in [(c, BAD_CLIENT_REQUESTS), (admin, BAD_CLUSTER_REQUESTS)]:
        for msg_type, body in cases:
            assert error_of(client, msg_type, body).code == "bad_request", (msg_type, body)
    assert len(c.call("list_devices")["devices"]) == 1
    assert admin.call("list_nodes") == {"nodes": []}


def test_a_backup_taken_while_serving_restores_a_master_with_every_record(master, make_node, tmp_path):
    make_node("n1", 1)
    alice = master.create_token("alice")
    a = master.client(alice)
    job = allocate(a)
    a.call("release_job", {"job_id": job["job_id"]})
    admin = master.admin()
    admin.call("revoke_token", {"token": master.create_token("mallory")})
    backup = tmp_path / "backups" / "master-1.db"
    backup.parent.mkdir()
    reply = admin.call("backup_db", {"path": str(backup)})
    assert reply == {"path": str(backup), "bytes": backup.stat().st_size} and reply["bytes"] > 0
    assert error_of(admin, "backup_db", {"path": str(backup)}).code == "exists", "never over a file"
    assert error_of(admin, "backup_db", {"path": "relative.db"}).code == "bad_request"
    assert error_of(admin, "backup_db", {"path": str(tmp_path / "nowhere" / "b.db")}).code == "bad_request"
    assert error_of(a, "backup_db", {"path": str(tmp_path / "x.db")}).code == "unauthorized", "the operator's only"

    (tmp_path / "restored").mkdir()
    restored = MasterProcess(tmp_path / "restored", db_path=str(backup))
    restored.start()
    try:
        r = restored.client(alice)
        assert r.call("usage") == a.call("usage") and r.call("list_devices") == a.call("list_devices")
        assert job_state(r, job["job_id"]) == "finished"
        again = restored.admin()
        assert again.call("list_tokens") == admin.call("list_tokens")
        assert again.call("list_events")["events"] == admin.call("list_events")["events"]
    finally:
        restored.stop()


def test_the_event_log_keeps_the_newest_events(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_EVENTS", 5)
    store = Store(tmp_path / "master.db")
    try:
        with store.tx():
            for i in range(12):
                store.add_event(float(i), "gpu_fault", "n1:0", f"flap {i}")
        assert [e["message"] for e in store.events(100)] == [f"flap {i}" for i in range(7, 12)]
        assert [e["message"] for e in store.events(2)] == ["flap 10", "flap 11"], "the newest, oldest first"
    finally:
        store.close()
