"""The data plane of a job: the op stream to its workers, uploads, downloads and queries.

Op records are appended to a batch and leave as one ``run_ops`` message when the batch is full or
before anything that must see their effect (fetch, sync, put, a query), so the front never waits
on the network per op. Every message goes to every worker (SPMD: all ranks run the same stream);
a request's answer is checked on each rank and the data comes from rank 0. Ids the garbage
collector frees are only appended to a list (safe at any point GC runs) and leave with the next
batch, which may still use them: the worker frees them after its ops.

Waits are sliced: between slices the stream checks that the workers are still there (a closed
connection to one of them, or the job failed by the master), so a lost worker is an error, never
a hang, while a long but healthy computation may take as long as it needs.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Callable

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemons import wire
from daemons.worker.pseudo_ops import GRAD_MODE_OP

# A batch leaves when the next record finds it this full or this old (docs/PERFORMANCE.md): the
# age bound lets the workers compute while the front is still tracing a step, the count bound
# caps a message.
BATCH_RECORDS = 256
BATCH_AGE_S = 0.001
WAIT_SLICE_S = 0.2                  # liveness is checked this often while waiting on a worker
# ... and at most this often when sending: a look at the connections' monitors costs ~5 us, a
# tenth of a request's round trip, and a loss found a few ms later changes nothing.
SEND_LIVENESS_S = 0.002
REPLY_SPIN_S = 300e-6               # a wait polls this long before sleeping (wire.Client spin_s)
HELLO_TIMEOUT_S = 60.0
EMPTY_OPS = ("aten::empty.memory_format", "aten::empty_strided")
_grad_enabled = torch.is_grad_enabled


class DeviceLostError(RuntimeError):
    """The job's workers are gone (a worker died, a node was lost, the master ended the job)."""


def out_of_memory(message: str) -> torch.OutOfMemoryError:
    # Worded as CUDA's: tools that lower the batch size on OOM (accelerate, Lightning) match
    # "CUDA out of memory." in the message.
    return torch.OutOfMemoryError(f"CUDA out of memory. {message} (the virtual device cuda:0)")


def remote_exception(e: wire.RemoteError) -> Exception:
    """The exception a CUDA program would see for a worker's error reply."""
    if e.code == "oom":
        return out_of_memory(e.message)
    if e.code == "device_lost":
        return DeviceLostError(f"CUDA error: the virtual device cuda:0 was lost: {e.message}")
    return RuntimeError(f"CUDA error on the virtual device cuda:0 ({e.code}): {e.message}\n"
                        "Device errors are reported asynchronously: the op named above may not be "
                        "the one that the Python traceback points at. For debugging consider "
                        "passing CUDA_LAUNCH_BLOCKING=1.")


class Stream:
    """Connections to one job's workers, in rank order, carrying its op stream."""

    def __init__(self, addresses: list[str], secret: str, *,
                 failure: Callable[[float], str | None] = lambda wait_s: None):
        """``failure(wait_s)`` says why the job ended (None: it did not), waiting up to ``wait_s``
        for the master to learn of it; it turns a lost connection into a message naming the cause."""
        self.addresses = addresses
        self.failure = failure
        self.lost: str | None = None
        self.seq = 0
        self._ids = itertools.count(1)
        self._batch: list = []
        self._batch_started = 0.0
        self._grad_mode = True   # a worker's, until a record says otherwise
        self._freed: list[int] = []
        self._alive_at = 0.0   # when _check_alive last looked (perf_counter)
        self._lock = threading.RLock()
        self._closed = False
        # CUDA's switch for debugging asynchronous errors: every op then waits for the workers,
        # so that a failure is raised at the program's line that issued it.
        self.blocking = os.environ.get("CUDA_LAUNCH_BLOCKING", "0") == "1"
        self.clients = [wire.Client(a, secret, max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES,
                                    spin_s=REPLY_SPIN_S) for a in addresses]
        self._monitors = []
        for c in self.clients:
            c.sock.setsockopt(zmq.SNDTIMEO, int(WAIT_SLICE_S * 1000))
            self._monitors.append(c.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        self.workers = [self.wait(rank, c.send("hello"), "hello", HELLO_TIMEOUT_S)
                        for rank, c in enumerate(self.clients)]
        # The smallest worker's cap, lowered by set_per_process_memory_fraction.
        self.cap = min(int(w["memory_cap"]) for w in self.workers)
        # At least the bytes any one worker holds: the fullest's figure at the last look, plus
        # every new storage streamed since, whole (frees are not subtracted). Only past the cap
        # does ``allocate`` look again.
        self._held_bound = 0
        for rank, info in enumerate(self.workers):
            if info["rank"] != rank or info["world_size"] != len(addresses):
                raise RuntimeError(f"worker at {addresses[rank]} says it is rank {info['rank']} of "
                                   f"{info['world_size']}, expected rank {rank} of {len(addresses)}")

    @property
    def memory_cap(self) -> int:
        return sum(int(w["memory_cap"]) for w in self.workers)

    # --- the stream --------------------------------------------------------------------------
    def new_id(self) -> int:
        return next(self._ids)  # atomic under the GIL: no lock on the per-op path

    def enqueue(self, op: str, args: list, kwargs, out):
        """Append one op record; ``args`` becomes the record's list (the caller's, not copied)."""
        with self._lock:
            # Checked before appending: the newest record stays, so that an upload right after
            # its allocation can still withdraw it (drop_fresh_allocation).
            if self._batch and (len(self._batch) >= BATCH_RECORDS
                                or time.perf_counter() - self._batch_started >= BATCH_AGE_S):
                self.flush()
            if not self._batch:
                self._batch_started = time.perf_counter()
            grad_mode = _grad_enabled()
            if grad_mode is not self._grad_mode:
                # The workers build autograd graphs of parameters named as leaves
                # (offload/remote_backward.py) only where the program does.
                self._grad_mode = grad_mode
                self.seq += 1
                self._batch.append([self.seq, GRAD_MODE_OP, [grad_mode], {}, None])
            self.seq += 1
            self._batch.append([self.seq, op, args, kwargs, out])
            if self.blocking:
                self.sync()

    def allocate(self, name: str, nbytes: int):
        """Count the new storages of an op before its record goes. Where they may not fit, ask the
        workers what they hold: if they do not, the op raises CUDA's out-of-memory error here, as
        CUDA's allocator raises it at the op, so that a program that catches it (a smaller
        batch, a skipped step) goes on from a state no later op has changed.

        The workers of a job of several place a result by rules of their own (sharded: a piece on
        each; replicated: all of it on each), so only what every placement needs is checked: an
        even share on each worker, since one of them holds at least that. A result that would
        break a cap only by being placed unevenly still fails, at the next sync."""
        self._held_bound += nbytes
        if self._held_bound <= self.cap:
            return
        stats = self.request("memory_stats", {})
        share = -(-nbytes // len(stats))
        room = max(int(r["cap"]) - int(r["allocated"]) for r in stats)
        fullest = max(int(r["allocated"]) for r in stats)
        if share > room:
            self._held_bound = fullest
            if len(stats) == 1:
                raise out_of_memory(f"{name} ran out of device memory: tried to allocate {nbytes} "
                                    f"bytes with {fullest} bytes in use and a cap of {self.cap} bytes")
            raise out_of_memory(f"{name} ran out of device memory: its {nbytes} bytes need at least "
                                f"{share} bytes on each of the {len(stats)} GPUs, and the emptiest "
                                f"has {room} bytes free (a cap of {self.cap} bytes each)")
        self._held_bound = fullest + nbytes

    def release_id(self, tid: int):
        self._freed.append(tid)

    def drop_fresh_allocation(self, tid: int) -> bool:
        """Withdraw the not yet sent ``empty`` that created ``tid``, if it is the last record."""
        with self._lock:
            if self._batch and self._batch[-1][4] == tid and self._batch[-1][1] in EMPTY_OPS:
                self._batch.pop()
                self.seq -= 1
                return True
            return False

    def flush(self):
        with self._lock:
            if not self._still_alive():
                self._batch.clear()  # lost, found in the autograd engine's thread: see _check_alive
                return
            # Appends racing with this (GC, other threads) land past n and stay for next time.
            n = len(self._freed)
            freed = self._freed[:n]
            del self._freed[:n]
            if self._batch:
                batch, self._batch = self._batch, []
                self._send_all("run_ops", {"ops": batch, "free": freed} if freed else {"ops": batch})
            elif freed:
                self._send_all("free", {"ids": freed})

    # --- transfers and queries ---------------------------------------------------------------
    def put(self, tid: int, tensor: torch.Tensor, wait_sent: bool, shard: str | None = None):
        """Upload ``tensor`` as ``tid`` on every worker, without copying it on the front.

        ``wait_sent`` returns only when zmq has let go of its buffer (the caller may then change
        it, as after a blocking host-to-device copy); otherwise the buffer is kept alive by the
        message and must not change until the next sync, like a ``non_blocking`` copy's.
        ``shard`` is the placement hint of a multi-worker job (docs/PROTOCOL.md, ``put``).
        """
        tensor = tensor.detach().resolve_conj().resolve_neg()
        with self._lock:
            self.flush()
            body = {"id": tid, "tensor": tensor, **({"shard": shard} if shard else {})}
            trackers = [self._send(rank, "put", body, track=wait_sent)
                        for rank in range(len(self.clients))]
        for tracker in trackers if wait_sent else ():
            while tracker is not None:
                try:
                    tracker.wait(WAIT_SLICE_S)
                    break
                except zmq.NotDone:
                    if not self._check_alive():
                        break

    def fetch(self, tid: int) -> torch.Tensor:
        return self.request("fetch", {"id": tid, "seq": self.seq})[0]["tensor"]

    def item(self, tid: int):
        return self.request("item", {"id": tid, "seq": self.seq})[0]["value"]

    def describe(self, ids: list[int]) -> list[tuple]:
        return [tuple(d) for d in self.request("describe", {"ids": ids})[0]["tensors"]]

    def sync(self) -> list[dict]:
        return self.request("sync", {"seq": self.seq})

    def request(self, msg_type: str, body: dict) -> list:
        """Send to every worker after the pending stream, then check every reply (rank order)."""
        with self._lock:
            self.flush()
            ids = [self._send(rank, msg_type, body) for rank in range(len(self.clients))]
            if len(ids) == 1:
                return [self.wait(0, ids[0], msg_type)]
            return self._replies(ids)

    def _replies(self, ids: list[int]) -> list:
        """Every rank's reply, waited for in rank order; an error from any rank is raised as soon
        as it comes. A rank that failed an op alone answers while the others still wait for it
        in a collective (daemons/worker/group_faults.py): its error is the one to raise."""
        replies: dict[int, object] = {}

        def take(rank: int, timeout_s: float):
            try:
                replies[rank] = self.clients[rank].wait(ids[rank], timeout_s, abandon=False)
            except wire.TransportTimeout:
                pass
            except wire.RemoteError as e:
                self._abandon(ids, replies.keys() | {rank})
                raise self._failed(e) from None

        while len(replies) < len(ids):
            rank = min(set(range(len(ids))) - replies.keys())
            take(rank, WAIT_SLICE_S)
            if rank in replies:
                continue
            if not self._check_alive():
                raise DeviceLostError(f"CUDA error: the virtual device cuda:0 was lost: {self.lost}")
            for other in range(rank + 1, len(ids)):
                if other not in replies:
                    take(other, 0)
        return [replies[rank] for rank in range(len(ids))]

    def _failed(self, e: wire.RemoteError) -> Exception:
        """The exception of a worker's error reply. A lost device stays lost: every later call
        raises at once, and nothing more is sent to workers that may no longer read."""
        if e.code == "device_lost":
            self.lost = e.message
        return remote_exception(e)

    def _abandon(self, ids: list[int], answered):
        """Stop waiting for the replies not yet read: each is dropped when it comes."""
        for rank, msg_id in enumerate(ids):
            if rank not in answered:
                try:
                    self.clients[rank].wait(msg_id, 0)
                except (wire.TransportTimeout, wire.RemoteError):
                    pass

    # --- transport ---------------------------------------------------------------------------
    def _send_all(self, msg_type: str, body):
        for rank in range(len(self.clients)):
            self._send(rank, msg_type, body)

    def _send(self, rank: int, msg_type: str, body, track: bool = False):
        client = self.clients[rank]
        while True:  # blocks only while the worker's queue is full: a slow worker, or a dead one
            try:
                return client.send_tracked(msg_type, body)[1] if track else client.send(msg_type, body)
            except zmq.Again:
                if not self._check_alive():
                    return None

    def wait(self, rank: int, msg_id: int, what: str, timeout_s: float | None = None):
        waited = 0.0
        while True:
            try:
                return self.clients[rank].wait(msg_id, WAIT_SLICE_S, abandon=False)
            except wire.TransportTimeout:
                if not self._check_alive():  # no answer will come: raise even in the engine's thread
                    raise DeviceLostError(f"CUDA error: the virtual device cuda:0 was lost: {self.lost}")
                waited += WAIT_SLICE_S
                if timeout_s is not None and waited >= timeout_s:
                    raise DeviceLostError(f"worker rank {rank} at {self.addresses[rank]} did not "
                                          f"answer {what!r} within {timeout_s:g} s") from None
            except wire.RemoteError as e:
                raise self._failed(e) from None

    def _still_alive(self) -> bool:
        """``_check_alive``, looking at the connections at most every ``SEND_LIVENESS_S``."""
        if self.lost is None:
            now = time.perf_counter()
            if now - self._alive_at < SEND_LIVENESS_S:
                return True
            self._alive_at = now
        return self._check_alive()

    def _check_alive(self) -> bool:
        """Raise DeviceLostError if the workers are gone; True while they are there.

        Inside a backward pass the ops run on the autograd engine's device thread, which cannot
        carry a Python exception out on torch 2.13 (SystemError, or std::terminate of the whole
        process): there the loss only returns False, the ops of the pass go nowhere, and the
        error is raised by the next call from the program's own thread (``opt.step()``, ``.item()``).
        """
        if self.lost is None:
            for rank, monitor in enumerate(self._monitors):
                while monitor.getsockopt(wire.EVENTS) & wire.POLLIN:  # no Poller per flush
                    if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                        why = self.failure(3.0)
                        self.lost = why or (f"the connection to worker rank {rank} at "
                                            f"{self.addresses[rank]} closed (its process exited)")
            if self.lost is None:
                self.lost = self.failure(0.0)
        if self.lost is None:
            return True
        if torch._C._current_graph_task_id() != -1:
            return False
        raise DeviceLostError(f"CUDA error: the virtual device cuda:0 was lost: {self.lost}")

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in self.clients:
                c.sock.disable_monitor()
                c.close()
            for m in self._monitors:
                m.close(linger=0)


class MemoryProbe:
    """The workers' memory figures for the heartbeat thread, asked on its own connections so that
    it never waits behind the op stream: each call collects the last answers and asks again."""

    def __init__(self, addresses: list[str], secret: str):
        self.clients = [wire.Client(a, secret) for a in addresses]
        self._pending: list[int | None] = [None] * len(addresses)
        self._last = [(0, 0)] * len(addresses)

    def poll(self) -> tuple[int, int]:
        """(allocated, peak) bytes summed over the workers, as last reported."""
        for rank, client in enumerate(self.clients):
            msg_id = self._pending[rank]
            if msg_id is not None:
                try:
                    stats = client.wait(msg_id, 0.01, abandon=False)
                    self._last[rank] = (int(stats["allocated"]), int(stats["peak"]))
                except wire.TransportTimeout:
                    continue  # busy (or gone: the stream's checks say so, not the probe)
                except wire.RemoteError:
                    pass
            self._pending[rank] = client.send("memory_stats")
        return sum(a for a, _ in self._last), sum(p for _, p in self._last)

    def close(self):
        for c in self.clients:
            c.close()
