"""The one wire protocol of the platform: sockets, envelope and msgpack codec (tensors included).

Every daemon (master, agent, worker) and every client (front process, CLI tools) speaks through
this module; nothing else in the tree packs or unpacks a message.

Wire layout of one message, frame by frame (a ROUTER socket sees the peer identity first):

    frame 0   MAGIC + request id    b"MOAI" + protocol version byte + 8-byte big-endian id; the
              + header              id sits before the header so that even a reply refusing an
                                    undecodable header reaches the request that caused it; then
                                    the header, a msgpack map {"type": str, "token": str|None,
                                    "body": any}. One frame, not two: each frame is a zmq message
                                    of its own, about 5 us a frame each way on loopback, a tenth
                                    of a small request's round trip (docs/PERFORMANCE.md)
    frame 1.. buffers               raw bytes of tensors / numpy arrays referenced from the body

Inside ``body`` a tensor or array is a msgpack ext value (``EXT_TENSOR`` / ``EXT_NDARRAY``) whose
payload is ``[dtype, shape, frame_index]``: the bytes travel as their own frame, sent with
``copy=False`` and received without a copy (``torch.frombuffer`` over the zmq frame).
Other ext values carry torch scalars types that appear in op arguments (dtype, device, layout,
memory format, complex numbers, tuples), ``RemoteRef`` (a handle to a tensor living on a worker),
``LeafRef`` / ``DetachedRef`` (the same handle, naming the tensor as a leaf of the worker's
autograd graph / detached from it) and ``GeneratorRef`` (a random number generator a worker holds).

Replies reuse the request's ``id`` and have ``type`` ``"ok"`` or ``"error"``; an error body is
``{"code": str, "message": str}``. Malformed input never raises out of a server loop: it is
answered with an error (when the peer can be addressed) and the loop goes on.
Never pickle: nothing received is ever executed.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAGIC = b"MOAI" + bytes([PROTOCOL_VERSION])

# Control messages are small; a header over this is refused with an error reply.
MAX_HEADER_BYTES = 4 * 1024 * 1024
# Hard per-message cap enforced by libzmq itself (the peer is disconnected past it): protects a
# daemon's memory from a hostile sender. Data-plane sockets raise it to fit whole tensors.
CONTROL_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DATA_MAX_MESSAGE_BYTES = 16 * 1024 * 1024 * 1024

DEFAULT_TIMEOUT_S = 10.0
SERVER_POLL_INTERVAL_S = 0.1

EXT_TENSOR = 1
EXT_NDARRAY = 2
EXT_DTYPE = 3
EXT_DEVICE = 4
EXT_LAYOUT = 5
EXT_MEMORY_FORMAT = 6
EXT_COMPLEX = 7
EXT_TUPLE = 8
EXT_REMOTE_REF = 9
EXT_LEAF_REF = 10
EXT_DETACHED_REF = 11
EXT_GENERATOR_REF = 12


class WireError(Exception):
    """Base class of every transport / protocol failure."""


class ProtocolError(WireError):
    """A message could not be decoded (bad magic, version, header or buffer reference).

    Not retryable as is: the sender must be fixed or upgraded to this protocol version.
    """


class TransportTimeout(WireError):
    """No reply arrived in time. The peer may be down or busy: retry, or reconnect if it persists."""


class RemoteError(WireError):
    """The peer answered with a structured error. ``code`` is machine-readable, the message is not."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteRef:
    """A handle naming a tensor held by a worker (its id in the worker's tensor table).

    A slotted class, not a frozen dataclass: a worker decodes one for every tensor argument of
    every op, and this one is made in half the time."""

    __slots__ = ("id",)

    def __init__(self, id: int):
        self.id = id

    def __eq__(self, other):
        return type(other) is type(self) and other.id == self.id

    def __hash__(self):
        return hash((type(self), self.id))

    def __repr__(self):
        return f"{type(self).__name__}(id={self.id})"


class LeafRef(RemoteRef):
    """A parameter as an op of the forward pass names it: a worker runs the op on a leaf of its
    own autograd graph sharing the tensor's storage, so that it can run the backward itself
    (docs/PROTOCOL.md, ``moai::backward``)."""

    __slots__ = ()


class DetachedRef(RemoteRef):
    """A tensor as ``detach()`` made it: a worker runs the op on the tensor detached from its own
    autograd graph (docs/PROTOCOL.md, ``moai::backward``)."""

    __slots__ = ()


class GeneratorRef(RemoteRef):
    """A random number generator a worker holds, by its id in the worker's table (a program's
    ``torch.Generator(device="cuda")``; docs/PROTOCOL.md, ``moai::generator``)."""

    __slots__ = ()


_REF_TYPES = {EXT_REMOTE_REF: RemoteRef, EXT_LEAF_REF: LeafRef, EXT_DETACHED_REF: DetachedRef,
              EXT_GENERATOR_REF: GeneratorRef}
_REF_CODES = {kind: code for code, kind in _REF_TYPES.items()}


def packed_ref(tid: int, code: int = EXT_REMOTE_REF) -> msgpack.ExtType:
    """``RemoteRef(tid)`` (or, by ``code``, one of its kinds: ``LeafRef`` ...) already in the form the
    packer writes, which msgpack packs without a ``default`` call: a sender naming one tensor in
    many records (the front's op stream) makes it once per tensor."""
    # tuple.__new__: ExtType's own __new__ re-checks in Python the two types known here, which
    # took a third of this function's time (the front makes one ref per tensor it creates).
    return tuple.__new__(msgpack.ExtType, (code, _INT_PACKER.pack(tid)))


# ----------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------

# This module never imports torch itself. A value to encode can be a tensor (dtype, device ...)
# only in a process that imported torch already, and a received one imports it (_torch_names).
# So the control plane and the tools, which carry no tensors, never pay torch's seconds and
# hundreds of MB; and a program importing this module before torch does not set off the front's
# offload hook (which imports this module) while this module is still half made.
def _loaded_torch():
    return sys.modules.get("torch")


@dataclass(frozen=True)
class _TorchNames:
    torch: Any
    dtypes: dict
    layouts: dict
    memory_formats: dict


@functools.cache
def _torch_names() -> _TorchNames:
    """torch and its values by their wire names, at the first torch value received."""
    try:
        import torch
    except ImportError:
        raise ProtocolError("a torch value was received by a process without torch") from None
    values = vars(torch).values()
    return _TorchNames(
        torch,
        {str(v).removeprefix("torch."): v for v in values if isinstance(v, torch.dtype)},
        {str(v): v for v in values if isinstance(v, torch.layout)},
        {str(v): v for v in values if isinstance(v, torch.memory_format)})


def _tensor_bytes(t, torch) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.stride(0) != 1:
        # Not laid out densely, or one element seen through a stride of 0 (``x.expand(1, 1)`` of a
        # scalar), which counts as contiguous and so stays a view of stride 0 after ``reshape``.
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    # A uint8 view reinterprets any dtype (bfloat16, float8, bool) without numpy support for it.
    return memoryview(flat.view(torch.uint8).numpy())


# One Packer reused for the ints inside ext values: ``packb`` builds a Packer per call, which
# costs more than packing the whole op record. Packing an int holds the GIL throughout.
_INT_PACKER = msgpack.Packer()


class _Packer:
    """Packs one body, collecting out-of-band buffers into ``self.buffers``."""

    def __init__(self):
        self.buffers: list = []

    def _buffer(self, data) -> int:
        self.buffers.append(data)
        return len(self.buffers)  # frame index: after the header's frame

    def default(self, obj):
        if isinstance(obj, RemoteRef):  # first: op streams are mostly references
            return packed_ref(obj.id, _REF_CODES[type(obj)])
        torch = _loaded_torch()
        if torch is not None:
            if isinstance(obj, torch.Tensor):
                if obj.is_complex():
                    idx = self._buffer(_tensor_bytes(torch.view_as_real(obj.resolve_conj()), torch))
                else:
                    idx = self._buffer(_tensor_bytes(obj, torch))
                payload = [str(obj.dtype).removeprefix("torch."), list(obj.shape), idx]
                return msgpack.ExtType(EXT_TENSOR, msgpack.packb(payload))
            if isinstance(obj, torch.dtype):
                return msgpack.ExtType(EXT_DTYPE, str(obj).removeprefix("torch.").encode())
            if isinstance(obj, torch.device):
                return msgpack.ExtType(EXT_DEVICE, str(obj).encode())
            if isinstance(obj, torch.layout):
                return msgpack.ExtType(EXT_LAYOUT, str(obj).encode())
            if isinstance(obj, torch.memory_format):
                return msgpack.ExtType(EXT_MEMORY_FORMAT, str(obj).encode())
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            idx = self._buffer(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
            return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([arr.dtype.str, list(arr.shape), idx]))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, complex):
            return msgpack.ExtType(EXT_COMPLEX, msgpack.packb([obj.real, obj.imag]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(EXT_TUPLE, self.pack(list(obj)))
        raise TypeError(f"cannot encode {type(obj).__name__} on the wire")

    def pack(self, obj) -> bytes:
        return msgpack.packb(obj, default=self.default, use_bin_type=True, strict_types=True)


# A reference is one per tensor argument of every streamed op: the ext hook reads its msgpack
# unsigned int directly (type byte -> encoded length) instead of running an unpacker on it.
_UINT_WIDTHS = {0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9}


class _Unpacker:
    def __init__(self, frames: list):
        self.frames = frames

    def _frame(self, idx) -> memoryview:
        if not isinstance(idx, int) or not 1 <= idx < len(self.frames):
            raise ProtocolError(f"buffer reference {idx!r} points at no frame")
        return _view(self.frames[idx])

    def ext_hook(self, code, data):
        ref = _REF_TYPES.get(code)
        if ref is not None and len(data) == 1 and data[0] < 0x80:
            return ref(data[0])  # a positive fixint: the first 127 ids, read in place
        if ref is not None and data and _UINT_WIDTHS.get(data[0]) == len(data):
            return ref(int.from_bytes(data[1:], "big"))  # msgpack's uint 8/16/32/64
        try:
            if code == EXT_TENSOR:
                dtype_name, shape, idx = msgpack.unpackb(data)
                return _decode_tensor(dtype_name, shape, self._frame(idx))
            if code == EXT_NDARRAY:
                dtype, shape, idx = msgpack.unpackb(data)
                buf = self._frame(idx)
                return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
            if code == EXT_DTYPE:
                return _torch_names().dtypes[data.decode()]
            if code == EXT_DEVICE:
                return _torch_names().torch.device(data.decode())
            if code == EXT_LAYOUT:
                return _torch_names().layouts[data.decode()]
            if code == EXT_MEMORY_FORMAT:
                return _torch_names().memory_formats[data.decode()]
            if code == EXT_COMPLEX:
                re, im = msgpack.unpackb(data)
                return complex(re, im)
            if code == EXT_TUPLE:
                return tuple(self.unpack(data))
            if ref is not None:
                tid = msgpack.unpackb(data)
                if not isinstance(tid, int):
                    raise ProtocolError("remote reference is not an integer")
                return ref(tid)
        except ProtocolError:
            raise
        except Exception as e:
            raise ProtocolError(f"bad ext value (code {code}): {e}") from None
        raise ProtocolError(f"unknown ext code {code}")

    def unpack(self, data) -> Any:
        return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=False)


def _decode_tensor(dtype_name: str, shape: list, buf: memoryview):
    names = _torch_names()
    torch = names.torch
    dtype = names.dtypes.get(dtype_name)
    if dtype is None:
        raise ProtocolError(f"unknown dtype {dtype_name!r}")
    elem = dtype.itemsize
    numel = 1
    for s in shape:
        if not isinstance(s, int) or s < 0:
            raise ProtocolError(f"bad tensor shape {shape!r}")
        numel *= s
    if numel * elem != len(buf):
        raise ProtocolError(f"tensor of shape {shape} {dtype_name} needs {numel * elem} bytes, got {len(buf)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The tensor aliases the received zmq frame, which nothing else reuses: writing is safe.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    if flat.data_ptr() % elem:
        # zmq puts a frame's bytes after its own header, not always on an element's boundary
        # (a complex128 one 8 bytes off 16): torch's kernels, even a copy of such a tensor,
        # crash on misaligned elements. Copied as bytes, they land aligned.
        flat = flat.clone()
    flat = flat.view(dtype)
    # A tensor of its own over the frame's storage, not a view of ``flat``: autograd refuses an
    # in-place op in grad mode on a view made without it (a worker stores uploads as they come,
    # and a model moved under no_grad then got ``param.data += delta`` refused there).
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape)


def encode(msg_type: str, body: Any = None, *, msg_id: int = 0, token: str | None = None) -> list:
    """Frames for one message (without routing identity)."""
    packer = _Packer()
    header = packer.pack({"type": msg_type, "token": token, "body": body})
    return [MAGIC + msg_id.to_bytes(8, "big") + header, *packer.buffers]


_PREFIX = len(MAGIC) + 8  # magic and request id, before the header in frame 0


def _view(frame) -> memoryview:
    """A received frame's bytes without a copy (a zmq.Frame, or bytes when not from a socket)."""
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)


def peek_id(frames: list) -> int:
    """The request id of a message whose header may be undecodable (0 when even that is missing)."""
    first = _view(frames[0]) if frames else memoryview(b"")
    return int.from_bytes(first[len(MAGIC):_PREFIX], "big") if len(first) >= _PREFIX else 0


@dataclass
class Message:
    type: str
    id: int
    token: str | None
    body: Any


def decode(frames: list) -> Message:
    """Decode frames produced by :func:`encode`; raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("message has no frames")
    first = _view(frames[0])
    if first[:4] != MAGIC[:4] or len(first) < _PREFIX:
        raise ProtocolError("not a MOAI message (bad magic)")
    if first[:len(MAGIC)] != MAGIC:
        raise ProtocolError(f"protocol version {first[4]} is not supported (this side speaks {PROTOCOL_VERSION})")
    msg_id = int.from_bytes(first[len(MAGIC):_PREFIX], "big")
    header_len = len(first) - _PREFIX
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if header_len == 0:
        raise ProtocolError("message has no header")
    try:
        header = _Unpacker(frames).unpack(first[_PREFIX:])
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"undecodable header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header is not a map with a string 'type'")
    token = header.get("token")
    if not (token is None or isinstance(token, str)):
        raise ProtocolError("header 'token' must be a string or nil")
    return Message(header["type"], msg_id, token, header.get("body"))


# ----------------------------------------------------------------------------------------------
# server
# ----------------------------------------------------------------------------------------------

Handler = Callable[[Message], Any]
NO_REPLY = object()  # a handler returning this sends nothing (fire-and-forget messages)


class RequestError(Exception):
    """Raised by a handler to answer with a structured error instead of a crash report."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- request bodies --------------------------------------------------------------------------

MAX_STRING_CHARS = 1024
MAX_INT = 2 ** 62            # fits SQLite's signed 64-bit integers and every int64 tensor index
_REQUIRED = object()


def field(body, name: str, typ, default=_REQUIRED):
    """``body[name]`` checked to be of ``typ`` (a type or tuple of types)."""
    if not isinstance(body, dict):
        raise RequestError("bad_request", "the request body must be a map")
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            raise RequestError("bad_request", f"missing field {name!r}")
        return default
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise RequestError("bad_request", f"field {name!r} must be {names}, not {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise RequestError("bad_request", f"field {name!r} is out of range")
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise RequestError("bad_request", f"field {name!r} is longer than {MAX_STRING_CHARS} characters")
    return value


class Server:
    """A ROUTER socket serving a dict of handlers, one message at a time.

    ``handlers`` maps a message type to ``fn(Message) -> body``. A handler may raise
    ``RequestError`` for a clean refusal; any other exception becomes an ``internal`` error reply
    (logged with its traceback) and the loop keeps serving. ``tick`` runs between messages at
    least every ``tick_interval_s`` for timers (heartbeat checks, scheduling).
    """

    def __init__(self, bind: str, handlers: dict[str, Handler], *, name: str,
                 max_message_bytes: int = CONTROL_MAX_MESSAGE_BYTES,
                 tick: Callable[[], None] | None = None, tick_interval_s: float = 0.5,
                 context: zmq.Context | None = None):
        self.name = name
        self.handlers = handlers
        self.tick = tick
        self.tick_interval_s = tick_interval_s
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.address = bind_socket(self.sock, bind)
        self._stop = threading.Event()
        self.current_peer: bytes | None = None

    def stop(self):
        self._stop.set()

    def install_signal_handlers(self):
        """SIGTERM/SIGINT end the loop after the message in hand (supervisord sends SIGTERM)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def reply(self, peer: bytes, msg_type: str, body: Any, msg_id: int):
        try:
            frames = encode(msg_type, body, msg_id=msg_id)
        except Exception as e:  # like a handler bug: the caller hears of it, the daemon stays up
            log.exception("%s: a %s reply could not be encoded", self.name, msg_type)
            frames = encode("error", {"code": "internal", "message": f"the reply could not be "
                                                                     f"encoded: {type(e).__name__}: {e}"},
                            msg_id=msg_id)
        try:
            self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as e:  # the peer left; nothing to tell it
            log.debug("%s: reply to a gone peer dropped: %s", self.name, e)

    def handle(self, peer: bytes, frames: list):
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("%s: malformed message: %s", self.name, e)
            self.reply(peer, "error", {"code": "malformed", "message": str(e)}, peek_id(frames))
            return
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.reply(peer, "error", {"code": "unknown_type",
                                       "message": f"{self.name} has no request type {msg.type!r}"}, msg.id)
            return
        self.current_peer = peer
        try:
            result = handler(msg)
        except RequestError as e:
            self.reply(peer, "error", {"code": e.code, "message": e.message}, msg.id)
            return
        except Exception as e:  # a handler bug must not take the daemon down
            log.exception("%s: handler %s failed", self.name, msg.type)
            self.reply(peer, "error", {"code": "internal", "message": f"{type(e).__name__}: {e}"}, msg.id)
            return
        finally:
            self.current_peer = None
        if result is not NO_REPLY:
            self.reply(peer, "ok", result, msg.id)

    def serve_once(self, timeout_s: float) -> bool:
        frames = recv_within(self.sock, timeout_s)
        if frames is None:
            return False
        if len(frames) < 2:
            return True
        self.handle(frames[0].bytes, frames[1:])
        return True

    def serve_forever(self):
        # Without a tick the wait is bounded only by the stop check: a server with none (a worker)
        # must sleep in its receive, not spin on zero timeouts.
        next_tick = time.monotonic() if self.tick else float("inf")
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    try:
                        self.tick()
                    except Exception:
                        log.exception("%s: tick failed", self.name)
                    next_tick = now + self.tick_interval_s
                self.serve_once(min(SERVER_POLL_INTERVAL_S, max(0.0, next_tick - time.monotonic())))
        finally:
            self.sock.close(linger=0)


# As plain ints: zmq's are enum flags, whose ``&`` costs a Python call in the polling loops.
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_receive_timeouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # socket -> ms set


def recv_within(sock: zmq.Socket, timeout_s: float) -> list | None:
    """The next message's frames (not copied), or None if none arrives within ``timeout_s``.

    A receive timeout rather than ``Socket.poll``, which builds and registers a Poller on every
    call: the receive path of every request the front waits on. The timeout is set only when it
    changes (a server waits with the same one message after message)."""
    timeout_ms = max(0, int(timeout_s * 1000))
    if _receive_timeouts.get(sock) != timeout_ms:
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        _receive_timeouts[sock] = timeout_ms
    try:
        return sock.recv_multipart(copy=False)
    except zmq.Again:
        return None


def recv_polling(sock: zmq.Socket, spin_s: float) -> list | None:
    """The next message's frames if one comes within ``spin_s``, polled for without sleeping: a
    thread still running reads a message due in microseconds sooner than one woken from sleep.
    Holds the GIL between checks."""
    end = time.perf_counter() + spin_s
    while True:
        if sock.getsockopt(EVENTS) & POLLIN:  # no syscall: zmq's own queue
            return sock.recv_multipart(copy=False)
        if time.perf_counter() >= end:
            return None


def bind_socket(sock: zmq.Socket, bind: str) -> str:
    """Bind to ``bind``; a port of 0 or ``*`` takes a random free port. Returns the bound address."""
    if bind.startswith("tcp://") and (bind.endswith(":0") or bind.endswith(":*")):
        host = bind[len("tcp://"):].rsplit(":", 1)[0]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(bind)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


# ----------------------------------------------------------------------------------------------
# client
# ----------------------------------------------------------------------------------------------

class Client:
    """A DEALER connection to one server, with replies matched to requests by id.

    ``send`` is fire-and-forget (the data plane streams op batches this way); ``call`` waits for
    the matching reply and drops late replies of earlier timed-out calls. Calls are serialized by a
    lock, so a thread that must not wait behind another (a heartbeat) uses its own Client.
    """

    _ids = itertools.count(1)

    def __init__(self, address: str, token: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = CONTROL_MAX_MESSAGE_BYTES,
                 spin_s: float = 0.0,
                 context: zmq.Context | None = None):
        """``spin_s``: how long ``wait`` polls for the reply before it sleeps in the receive. A
        reply due in tens of microseconds (a worker's ``.item()``) is read sooner by a thread
        still running than by one woken from sleep, as CUDA spins in a synchronize: 78-82 instead
        of 91-106 us on loopback (docs/PERFORMANCE.md). The poll holds the GIL between checks
        for at most ``spin_s``."""
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self.ctx = context or zmq.Context.instance()
        self._lock = threading.RLock()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.connect(address)
        self._pending: dict[int, Message] = {}
        self._abandoned: set[int] = set()

    def close(self):
        with self._lock:
            self.sock.close(linger=0)

    def send(self, msg_type: str, body: Any = None) -> int:
        msg_id = next(self._ids)
        with self._lock:
            self.sock.send_multipart(encode(msg_type, body, msg_id=msg_id, token=self.token), copy=False)
        return msg_id

    def send_tracked(self, msg_type: str, body: Any = None) -> tuple[int, zmq.MessageTracker]:
        """``send`` for a caller lending a buffer it may overwrite later: the tracker's ``wait()``
        returns once zmq no longer reads the message's last frame (a tensor body's buffer)."""
        msg_id = next(self._ids)
        with self._lock:
            tracker = self.sock.send_multipart(encode(msg_type, body, msg_id=msg_id, token=self.token),
                                               copy=False, track=True)
        return msg_id, tracker

    def wait(self, msg_id: int, timeout_s: float | None = None, *, abandon: bool = True) -> Any:
        """Wait for the reply to request ``msg_id``; returns its body or raises RemoteError.

        On a timeout a late reply is dropped, unless ``abandon`` is false: a caller that waits in
        slices (checking its peer's liveness between them) waits again for the same reply.
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            while msg_id not in self._pending:
                frames = recv_polling(self.sock, self.spin_s) if self.spin_s else None
                if frames is None:
                    frames = recv_within(self.sock, deadline - time.monotonic())
                if frames is None:
                    if abandon:
                        self._abandoned.add(msg_id)
                    raise TransportTimeout(f"no reply from {self.address} within "
                                           f"{self.timeout_s if timeout_s is None else timeout_s:.1f}s")
                try:
                    reply = decode(frames)
                except ProtocolError as e:
                    if peek_id(frames) == msg_id:  # the id sits where every version has it
                        raise ProtocolError(f"undecodable reply from {self.address}: {e}") from None
                    log.warning("undecodable reply from %s: %s", self.address, e)
                    continue
                if reply.id in self._abandoned:  # a late answer to a call that already timed out
                    self._abandoned.discard(reply.id)
                    continue
                self._pending[reply.id] = reply
            reply = self._pending.pop(msg_id)
        if reply.type == "error":
            body = reply.body if isinstance(reply.body, dict) else {}
            raise RemoteError(str(body.get("code", "error")), str(body.get("message", reply.body)))
        return reply.body

    def call(self, msg_type: str, body: Any = None, timeout_s: float | None = None) -> Any:
        return self.wait(self.send(msg_type, body), timeout_s)


def setup_logging(name: str):
    """Daemons log to stderr, one line per record, for supervisord to capture."""
    logging.basicConfig(level=os.environ.get("MOAI_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
