"""The wire protocol: codec round trips, malformed input, and a real ROUTER/DEALER pair on loopback."""
import os
import random
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from daemons import wire

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]


def roundtrip(body):
    frames = [bytes(f) if isinstance(f, memoryview) else f for f in wire.encode("t", body, msg_id=7, token="k")]
    return wire.decode(frames)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_roundtrip_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    msg = roundtrip({"x": t, "empty": torch.empty(0, 4, dtype=dtype)})
    assert msg.id == 7 and msg.token == "k"
    assert msg.body["x"].dtype == dtype and torch.equal(msg.body["x"], t)
    assert msg.body["empty"].shape == (0, 4)


def test_noncontiguous_and_scalar_tensors():
    t = torch.arange(24.).reshape(4, 6).t()[1:, ::2]
    s = torch.tensor(3.5)
    msg = roundtrip([t, s])
    assert torch.equal(msg.body[0], t) and msg.body[1].shape == () and msg.body[1].item() == 3.5


@pytest.mark.parametrize("make", [lambda: torch.tensor(2.5).expand(1, 1), lambda: torch.tensor(2.5).expand(4),
                                  lambda: torch.ones(3, 1).expand(3, 5)], ids=["one-element", "scalar", "rows"])
def test_expanded_tensors_travel_as_their_values(make):
    """A stride of 0: one element of ``expand(1, 1)`` counts as contiguous and stays such a view."""
    t = make()
    got = roundtrip([t]).body[0]
    assert got.shape == t.shape and torch.equal(got, t)


@pytest.mark.parametrize("dtype, offset", [(torch.complex128, 8), (torch.complex64, 4), (torch.float64, 4),
                                           (torch.float32, 2), (torch.bfloat16, 1), (torch.float32, 16)],
                         ids=lambda v: str(v))
def test_a_tensor_in_a_frame_off_its_alignment_is_copied_to_an_aligned_one(dtype, offset):
    """zmq hands out a frame's bytes off an element's boundary (a large frame's 8 bytes off 16);
    torch's kernels crashed on such a tensor (segmentation fault in ``isclose``, even in a copy)."""
    t = torch.arange(15.).reshape(3, 5).to(dtype)   # an odd count: a copy's last element is alone
    header, data = wire.encode("t", {"x": t})
    backing = bytearray(len(data) + 64)
    start = -torch.frombuffer(backing, dtype=torch.uint8).data_ptr() % 16 + offset
    backing[start:start + len(data)] = data
    got = wire.decode([header, memoryview(backing)[start:start + len(data)]]).body["x"]
    assert got.data_ptr() % dtype.itemsize == 0
    assert torch.equal(got, t) and torch.isclose(got, t).all()


def test_tensor_travels_out_of_band():
    t = torch.ones(1000)
    frames = wire.encode("t", {"x": t})
    assert len(frames) == 2 and len(frames[1]) == 4000  # magic and header, one raw buffer
    assert len(frames[0]) < 100


def test_torch_scalar_types_and_refs():
    body = [torch.float16, torch.device("cpu"), torch.strided, torch.channels_last, 1 + 2j,
            (1, 2), wire.RemoteRef(42), np.arange(5, dtype=np.int16), None, 1.5, "s", b"b"]
    out = roundtrip(body).body
    assert out[:7] == body[:7]
    assert isinstance(out[5], tuple)
    assert np.array_equal(out[7], body[7]) and out[7].dtype == np.int16
    assert out[8:] == body[8:]


@pytest.mark.parametrize("tid", [5, 300, 70000, 2**40], ids=["fixint", "uint16", "uint32", "uint64"])
def test_leaf_detached_and_plain_refs_stay_what_they_are(tid):
    """A parameter named as a leaf of the worker's graph, or a tensor detached from it, must
    never arrive as the plain tensor, nor the other way round (docs/PROTOCOL.md,
    ``moai::backward``)."""
    body = [wire.LeafRef(tid), wire.RemoteRef(tid), wire.DetachedRef(tid), wire.packed_ref(tid, wire.EXT_LEAF_REF),
            wire.packed_ref(tid), wire.packed_ref(tid, wire.EXT_DETACHED_REF)]
    out = roundtrip(body).body
    assert [type(r) for r in out] == [wire.LeafRef, wire.RemoteRef, wire.DetachedRef] * 2
    assert {r.id for r in out} == {tid}
    assert wire.LeafRef(tid) != wire.RemoteRef(tid) != wire.DetachedRef(tid)


def test_torch_is_loaded_only_by_the_first_torch_value_received():
    """The control plane and the tools carry no tensors and never load torch (seconds, hundreds of
    MB); a process that receives a tensor gets it decoded all the same."""
    frames = wire.encode("put", {"t": torch.arange(3), "dtype": torch.float16})
    program = (
        "import sys; from daemons import wire\n"
        "control = wire.decode(wire.encode('hello', {'n': 1, 'ref': wire.RemoteRef(7)}))\n"
        "print('torch' in sys.modules, control.body)\n"
        "body = wire.decode([bytes.fromhex(f) for f in sys.argv[1:]]).body\n"
        "print('torch' in sys.modules, body['t'].tolist(), body['dtype'])\n")
    out = subprocess.run([sys.executable, "-c", program, *(bytes(f).hex() for f in frames)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "MOAI_OFFLOAD": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("False {'n': 1, 'ref': RemoteRef(id=7)}\n"
                          "True [0, 1, 2] torch.float16\n")


def test_unencodable_object_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot encode object"):
        wire.encode("t", {"x": object()})


def header(obj, *buffers) -> list:
    return [wire.MAGIC + bytes(8) + msgpack.packb(obj), *buffers]


@pytest.mark.parametrize("frames, match", [
    ([], "no frames"),
    ([b"MOAI\x02"], "bad magic"),
    ([b"HTTP/1.1 200 OK"], "bad magic"),
    ([b"MOAI\x09" + bytes(8) + msgpack.packb({"type": "x"})], "version 9"),
    ([wire.MAGIC + bytes(8)], "no header"),
    ([wire.MAGIC + bytes(8) + b"\xc1\xc1"], "undecodable"),
    (header([1, 2]), "not a map"),
    (header({"type": "x", "token": 5}), "'token' must be a string"),
    (header({"type": "x", "body": msgpack.ExtType(1, msgpack.packb(["float32", [4], 5]))}), "points at no frame"),
    (header({"type": "x", "body": msgpack.ExtType(1, msgpack.packb(["float32", [4], 0]))}), "points at no frame"),
    (header({"type": "x", "body": msgpack.ExtType(1, msgpack.packb(["float32", [4], 1]))}, b"abc"), "needs 16 bytes"),
    (header({"type": "x", "body": msgpack.ExtType(1, msgpack.packb(["nope", [1], 1]))}, b"abcd"), "unknown dtype"),
    (header({"type": "x", "body": msgpack.ExtType(99, b"")}), "unknown ext code"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(frames)


@pytest.fixture
def server():
    calls = []

    def echo(msg):
        calls.append(msg)
        return {"echo": msg.body}

    def boom(msg):
        raise RuntimeError("handler bug")

    def refuse(msg):
        raise wire.RequestError("nope", "refused politely")

    def slow(msg):
        time.sleep(msg.body)
        return {"slept": msg.body}

    srv = wire.Server("tcp://127.0.0.1:0", {"echo": echo, "boom": boom, "refuse": refuse, "slow": slow,
                                            "quiet": lambda m: wire.NO_REPLY,
                                            "unencodable": lambda m: {"value": object()}}, name="test")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(5)


def test_request_reply_and_structured_errors(server):
    c = wire.Client(server.address, token="tok", timeout_s=5)
    t = torch.randn(64, 64)
    assert torch.equal(c.call("echo", {"t": t})["echo"]["t"], t)
    with pytest.raises(wire.RemoteError) as e:
        c.call("boom")
    assert e.value.code == "internal" and "handler bug" in e.value.message
    with pytest.raises(wire.RemoteError, match="nope: refused politely"):
        c.call("refuse")
    with pytest.raises(wire.RemoteError, match="unknown_type"):
        c.call("no_such_type")
    with pytest.raises(wire.RemoteError, match="internal: the reply could not be encoded: TypeError"):
        c.call("unencodable")   # a reply the codec refuses does not take the server down
    with pytest.raises(wire.TransportTimeout):
        c.call("quiet", timeout_s=0.2)
    assert c.call("echo", 1) == {"echo": 1}  # the client is still usable after a timeout
    c.close()


def test_a_spinning_client_polls_only_briefly_then_sleeps_for_its_reply(server):
    """A data-plane client polls for a reply before sleeping (spin_s): a quick reply is read by
    the poll, a slow one by the sleeping receive, and the wait costs no more CPU than the poll."""
    c = wire.Client(server.address, timeout_s=5, spin_s=0.001)
    try:
        assert c.call("echo", 1) == {"echo": 1}
        cpu = time.process_time()
        assert c.call("slow", 0.5) == {"slept": 0.5}
        assert time.process_time() - cpu < 0.1
        with pytest.raises(wire.TransportTimeout):
            c.call("quiet", timeout_s=0.2)
        assert c.call("echo", 2) == {"echo": 2}
    finally:
        c.close()


def test_garbage_gets_an_error_reply_and_server_keeps_serving(server):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.address)
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 4)
        raw.send_multipart([rng.randbytes(rng.randint(0, 64)) for _ in range(n)])
    replies = 0
    while raw.poll(2000):
        frames = raw.recv_multipart()
        msg = wire.decode(frames)
        assert msg.type == "error" and msg.body["code"] == "malformed"
        replies += 1
        if replies == 300:
            break
    assert replies == 300
    raw.close(0)
    good = wire.Client(server.address, timeout_s=5)
    assert good.call("echo", "still here") == {"echo": "still here"}
    good.close()


def test_a_peer_of_another_protocol_version_is_named_at_once_not_waited_for():
    """A daemon left on an older release refuses a newer client's request in its own framing:
    the client reads the request id where every version keeps it and says what happened, instead
    of timing out on a reply it cannot decode."""
    ctx = zmq.Context.instance()
    old = ctx.socket(zmq.ROUTER)
    port = old.bind_to_random_port("tcp://127.0.0.1")
    client = wire.Client(f"tcp://127.0.0.1:{port}", timeout_s=10)
    try:
        msg_id = client.send("hello")
        peer, request = old.recv_multipart()
        assert wire.peek_id([request]) == msg_id
        old.send_multipart([peer, b"MOAI\x01" + msg_id.to_bytes(8, "big"),
                            msgpack.packb({"type": "error", "body": {"code": "malformed"}})])
        started = time.monotonic()
        with pytest.raises(wire.ProtocolError, match="protocol version 1 is not supported"):
            client.wait(msg_id)
        assert time.monotonic() - started < 2
    finally:
        client.close()
        old.close(0)


def test_oversized_header_is_refused(server):
    c = wire.Client(server.address, timeout_s=5)
    with pytest.raises(wire.RemoteError, match="exceeds"):
        c.call("echo", "x" * (wire.MAX_HEADER_BYTES + 10))
    assert c.call("echo", 2) == {"echo": 2}
    c.close()


def test_an_idle_server_sleeps_instead_of_spinning(server):
    """A server without a tick (a worker) waits in its receive: holding a GPU's host core at 100%
    while a job thinks would slow the job's own front and every process beside it."""
    client = wire.Client(server.address)
    try:
        assert client.call("echo", 1) == {"echo": 1}   # the loop is running
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.2
        assert client.call("echo", 2) == {"echo": 2}   # and still answers at once
    finally:
        client.close()
