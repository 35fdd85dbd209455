"""Many fronts at once against one master: every request is answered, no GPU is ever given to two
jobs, the queue drains, and every job is billed once. Bounded: 40 users x 5 jobs on 16 GPUs of
two fake nodes, all on loopback."""
import threading
import time

import pytest

from daemons import wire
from master_fixture import make_node, master  # noqa: F401

pytestmark = pytest.mark.timeout(180)

USERS = 40
JOBS_PER_USER = 5
GPUS_PER_NODE = 8
HOLD_S = 0.03                 # how long a front keeps its GPU before releasing it
WAIT_RUNNING_S = 60.0


def front(master, token: str, errors: list):
    """One user's fronts, one after another: allocate, wait in the queue if need be, hold, release."""
    client = master.client(token, timeout_s=20.0)
    try:
        for _ in range(JOBS_PER_USER):
            job = client.call("allocate_job", {"pid": 1, "process_name": "python load.py", "hostname": "f"})
            deadline = time.monotonic() + WAIT_RUNNING_S
            while job["state"] != "running":  # polling keeps a queued front alive, as the real one does
                assert job["state"] in ("queued", "starting") and time.monotonic() < deadline, job
                time.sleep(0.02)
                job = client.call("job_status", {"job_id": job["job_id"]})
            client.call("heartbeat_job", {"job_id": job["job_id"], "memory_used": 0, "memory_peak": 0})
            time.sleep(HOLD_S)
            client.call("release_job", {"job_id": job["job_id"], "exit_code": 0})
    except (AssertionError, wire.WireError) as e:
        errors.append(f"{token[:6]}: {e!r}")
    finally:
        client.close()


def test_forty_fronts_at_once_share_sixteen_gpus_without_a_double_allocation(master, make_node):
    nodes = [make_node(f"n{i}", GPUS_PER_NODE) for i in range(2)]
    tokens = [master.create_token(f"user{i}") for i in range(USERS)]
    errors: list = []
    overlaps: list = []
    most_held = 0
    done = threading.Event()

    def watch():  # the master's books, read while the load runs
        nonlocal most_held
        admin = master.admin()
        try:
            while not done.is_set():
                held = [w for j in admin.call("list_all_jobs")["jobs"] if j["state"] in ("starting", "running")
                        for w in j["workers"]]
                if len(held) != len(set(held)):
                    overlaps.append(held)
                most_held = max(most_held, len(held))
                time.sleep(0.02)
        finally:
            admin.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    threads = [threading.Thread(target=front, args=(master, t, errors)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    elapsed = time.monotonic() - started
    done.set()
    watcher.join(timeout=10)

    assert errors == [] and not any(t.is_alive() for t in threads), errors[:5]
    assert overlaps == [], overlaps[:1]
    assert most_held <= 2 * GPUS_PER_NODE
    admin = master.admin()
    jobs = admin.call("list_all_jobs")["jobs"]
    assert len(jobs) == USERS * JOBS_PER_USER and {j["state"] for j in jobs} == {"finished"}
    usage = admin.call("list_usage")["tokens"]
    assert sorted(u["jobs"] for u in usage) == [JOBS_PER_USER] * USERS, "every job billed once"
    assert sum(len(n.launched) for n in nodes) == USERS * JOBS_PER_USER
    assert [n["free"] for n in admin.call("list_nodes")["nodes"]] == [GPUS_PER_NODE] * 2
    print(f"{USERS * JOBS_PER_USER} jobs of {USERS} concurrent fronts in {elapsed:.1f} s; "
          f"at most {most_held} GPUs held at once")
