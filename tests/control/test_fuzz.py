"""Hostile input against the real master, agent and worker (loopback only): random frames,
undecodable headers, wrong protocol versions, bad ext values, random bodies for every request
type with no, wrong and right tokens, and oversized messages. Every message gets a structured
error (or, for a well-formed request, a proper answer), and each daemon keeps serving afterwards
in the same process."""
import random

import msgpack
import pytest
import zmq

from daemons import wire
from stack_front import fronts, new_token  # noqa: F401

pytestmark = pytest.mark.timeout(180)

FRAMES_PER_DAEMON = 1000
REPLY_TIMEOUT_S = 5.0
SEED = 20240601
FIELD_NAMES = ["job_id", "device_id", "flavor", "all", "pid", "process_name", "hostname", "memory_used",
               "memory_peak", "exit_code", "node", "gpus", "workers", "agent_addr", "worker_host",
               "worker_port_base", "gpu", "rank", "world_size", "job_secret", "rendezvous", "memory_cap",
               "index", "memory", "util", "reason", "user", "id", "seq", "ids", "ops", "tensor", "token",
               "drained", "max_gpus", "limit"]
MASTER_TYPES = ["hello", "list_flavors", "list_devices", "add_device", "remove_device", "switch_device",
                "set_device_flavor", "allocate_job", "job_status", "heartbeat_job", "release_job",
                "list_processes", "list_physical_gpus", "usage", "register_node", "heartbeat_node",
                "report_worker_exit", "create_token", "list_tokens", "revoke_token", "drain_node",
                "limit_token", "list_events", "list_nodes", "list_all_jobs", "list_usage"]
# Not end_job: with the cluster secret a small random job_id may be the job checked afterwards;
# not backup_db: a random "/name" would write a file at the machine's root (their bad fields are
# tested in test_master.py).
AGENT_TYPES = ["launch_worker", "stop_worker", "node_status"]
# Requests whose answer the worker owes: the streamed ones (run_ops, put, free) answer nothing when
# accepted, and shutdown would end the test's worker.
WORKER_TYPES = ["hello", "fetch", "item", "describe", "sync", "memory_stats", "reset_peak"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2 ** 31, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.choice([0, 3, 40, 2000])))
    if kind == 5:
        return rng.randbytes(rng.choice([0, 8, 300]))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(12)))
    return {rng.choice(FIELD_NAMES + [7, ""]): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_message(rng: random.Random, msg_id: int, types: list[str], tokens: list) -> list[bytes]:
    """One hostile message, as raw frames (the request id after the magic when it has one)."""
    magic = wire.MAGIC + msg_id.to_bytes(8, "big")
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randbytes(rng.randrange(30)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:
        return [magic + rng.randbytes(rng.randrange(0, 60))]
    if kind == 2:
        return [b"MOAI" + bytes([wire.PROTOCOL_VERSION + 1]) + msg_id.to_bytes(8, "big") + b"\x80"]
    if kind == 3:
        header = rng.choice([random_value(rng), {"type": random_value(rng)},
                             {"type": rng.choice(types), "token": rng.randrange(5)}])
        return [magic + msgpack.packb(header, use_bin_type=True)]
    body = random_value(rng) if kind == 4 else {f: random_value(rng) for f in rng.sample(FIELD_NAMES, 4)}
    header = {"type": rng.choice(types + ["no_such_type"]), "token": rng.choice(tokens), "body": body}
    frames = [magic + msgpack.packb(header, use_bin_type=True)]
    if rng.random() < 0.2:
        frames.append(rng.randbytes(rng.randrange(64)))
    return frames


def fuzz(address: str, types: list[str], tokens: list, seed: int) -> dict[str, int]:
    """Send FRAMES_PER_DAEMON hostile messages one by one; returns how often each reply code came.
    A refusal carries whatever request id could be read after the magic (0 when none)."""
    rng = random.Random(seed)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    codes: dict[str, int] = {}
    try:
        for n in range(1, FRAMES_PER_DAEMON + 1):
            frames = random_message(rng, n, types, tokens)
            sock.send_multipart(frames)
            while True:  # skipping late answers to earlier requests the daemon answers later
                assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply to {frames!r:.300}"
                reply = wire.decode(sock.recv_multipart())
                if reply.id == wire.peek_id(frames):
                    break
            code = reply.body["code"] if reply.type == "error" else "ok"
            assert reply.type in ("ok", "error") and isinstance(code, str), reply
            codes[code] = codes.get(code, 0) + 1
    finally:
        sock.close()
    return codes


def oversized(address: str, token: str) -> str:
    """A header over the limit is refused; a message over libzmq's cap only drops its sender."""
    header_limit = wire.Client(address, token, timeout_s=REPLY_TIMEOUT_S)
    try:
        with pytest.raises(wire.RemoteError) as refused:
            header_limit.call("hello", {"pad": "x" * (wire.MAX_HEADER_BYTES + 1)})
    finally:
        header_limit.close()
    huge = wire.Client(address, token, timeout_s=1.0)
    try:
        with pytest.raises(wire.TransportTimeout):
            huge.call("hello", {"pad": b"x" * (wire.CONTROL_MAX_MESSAGE_BYTES + 1)})
    finally:
        huge.close()
    return refused.value.code


def test_hostile_messages_get_structured_errors_and_every_daemon_keeps_serving(cluster, fronts):
    front = fronts()
    front.allocate()
    front.hello()
    status = front.status()
    worker_addr, secret = status["workers"][0]["address"], status["job_secret"]
    pids = {p: cluster.head.pid(p) for p in ("master", "agent", "workers:worker-00")}
    cluster_secret = cluster.settings.cluster_secret

    # A user of its own: random ids must not release or fail the job checked afterwards.
    user = new_token(cluster, "fuzzer")
    master_codes = fuzz(cluster.settings.master_addr, MASTER_TYPES, [None, "forged", user, cluster_secret],
                        SEED)
    agent_codes = fuzz(cluster.settings.agent_addr, AGENT_TYPES, [None, "forged", cluster_secret], SEED + 1)
    worker_codes = fuzz(worker_addr, WORKER_TYPES, [None, "forged", secret], SEED + 2)
    for codes in (master_codes, agent_codes, worker_codes):
        assert {"malformed", "unauthorized", "unknown_type"} <= set(codes), codes
    for codes in (master_codes, agent_codes, worker_codes):
        assert "internal" not in codes and "bad_request" in codes, codes
    assert oversized(cluster.settings.master_addr, cluster.token) == "malformed"
    assert oversized(cluster.settings.agent_addr, cluster_secret) == "malformed"

    assert {p: cluster.head.pid(p) for p in pids} == pids, "no daemon died or restarted"
    assert front.status()["state"] == "running" and cluster.nodes_alive() == {"node0": True}
    assert front.hello()[0]["job_id"] == front.job_id
    assert cluster.head.agent().call("node_status")["workers"][0]["job_id"] == front.job_id
