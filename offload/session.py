"""The process's one job session: what the virtual device's tensors run on.

Created the first time the program touches ``cuda:0`` (``current()``), like CUDA's lazy context:
it allocates a job at the master (offload/job.py), connects to the job's workers
(offload/stream.py) and releases the job when the process exits. Module-level functions are the
API of the rest of the layer: dispatch.py streams ops through ``current()``, tensor.py frees ids
from ``__del__`` through ``release_id``, device.py and cuda_facade.py reach seeds, sync, memory
and device queries here. Queries that need no device (memory of a process that never used it,
a seed before first use) do not allocate one.
"""
from __future__ import annotations

import atexit
import os
import threading

import torch

from daemons import config
from daemons.wire import RemoteRef
from daemons.worker.pseudo_ops import GENERATOR_OP, GET_RNG_STATE_OP, SEED_OP, SET_RNG_STATE_OP
from offload import interrupt
from offload.job import Job
from offload.stream import MemoryProbe, Stream

_session: Session | None = None
_lock = threading.Lock()
_pending_seed: int | None = None
_start_hooks: list = []   # called with each new session before it streams anything
_forked = False


def _named(generator) -> list:
    return [] if generator is None else [generator]


class Session:
    def __init__(self, stream: Stream, job: Job | None = None, remote_backward: bool = True):
        self.stream = stream
        self.job = job
        self.runs_backward = remote_backward   # offload/remote_backward.py
        self.pid = os.getpid()
        # The per-op calls go straight to the stream: no extra Python frame per op.
        self.new_id = stream.new_id
        self.enqueue = stream.enqueue
        self.allocate = stream.allocate
        self.release_id = stream.release_id
        self.drop_fresh_allocation = stream.drop_fresh_allocation
        self.put = stream.put
        self.fetch = stream.fetch
        self.item = stream.item
        self.describe = stream.describe
        self._probe = None
        if job is not None:
            self._probe = MemoryProbe(job.addresses, job.secret)
            job.memory = self._probe.poll

    @classmethod
    def from_master(cls, settings: config.Settings | None = None) -> Session:
        settings = settings or config.load()
        job = Job(settings)
        try:
            return cls(Stream(job.addresses, job.secret, failure=job.failure_reason), job,
                       settings.remote_backward)
        except BaseException:
            job.release()
            raise

    # The RNG calls are about the device's default generator, or about the generator that
    # ``generator`` (a packed GeneratorRef, offload/generators.py) names.
    def new_generator(self, seed: int) -> int:
        tid = self.new_id()
        self.enqueue(GENERATOR_OP, [int(seed)], {}, tid)
        return tid

    def manual_seed(self, seed: int, generator=None):
        self.enqueue(SEED_OP, [int(seed)] + _named(generator), {}, None)

    def get_rng_state(self, generator=None) -> torch.Tensor:
        tid = self.new_id()
        self.enqueue(GET_RNG_STATE_OP, _named(generator), {}, tid)
        try:
            return self.fetch(tid).clone()
        finally:
            self.release_id(tid)

    def set_rng_state(self, state: torch.Tensor, generator=None):
        tid = self.new_id()
        self.put(tid, state.to("cpu", torch.uint8), wait_sent=True)
        self.enqueue(SET_RNG_STATE_OP, [RemoteRef(tid)] + _named(generator), {}, None)
        self.release_id(tid)

    def synchronize(self):
        self.stream.sync()

    def memory_stats(self) -> dict:
        """Bytes held by the device (all its workers), after every op streamed so far."""
        replies = self.stream.request("memory_stats", {})
        return {key: sum(int(r[key]) for r in replies) for key in ("allocated", "peak", "cap")}

    def memory_snapshot(self) -> list[dict]:
        """The workers' live allocations as CUDA's snapshot segments, each its rank's as ``device``."""
        replies = self.stream.request("memory_snapshot", {})
        return [{**segment, "device": rank} for rank, reply in enumerate(replies)
                for segment in reply["segments"]]

    def reset_peak(self):
        self.stream.request("reset_peak", {})

    def set_memory_fraction(self, fraction: float):
        replies = self.stream.request("set_memory_fraction", {"fraction": fraction})
        self.stream.cap = min(int(r["cap"]) for r in replies)

    def total_memory(self) -> int:
        return self.stream.memory_cap

    def gpu_telemetry(self) -> list[dict]:
        if self.job is None:
            raise RuntimeError("the GPUs' telemetry comes from the MoAI master, and this session's "
                               "workers were started without one")
        return self.job.gpu_telemetry()

    def device_size_name(self) -> str:
        """The device size's menu name; workers started without a master go by their memory."""
        name = self.job.device_name() if self.job is not None else ""
        return name or f"{self.stream.memory_cap >> 20}MB"

    def close(self):
        if os.getpid() != self.pid:
            return  # a forked child's copy: the parent owns the job
        if self.job is not None:
            self.job.release()  # first: it stops the heartbeat thread, the probe's only user
        if self._probe is not None:
            self._probe.close()
        self.stream.close()


# --- the process's session ----------------------------------------------------------------------
def current() -> Session:
    session = _session
    if session is not None:
        return session
    with _lock:
        if _session is None:
            if _forked:
                raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with "
                                   "multiprocessing, you must use the 'spawn' start method")
            interrupt.install()
            _install(Session.from_master())
        return _session


def connect(addresses: list[str], secret: str) -> Session:
    """A session on workers started without a master (tests, benchmarks); replaces the current one."""
    close()
    interrupt.install()
    with _lock:
        _install(Session(Stream(addresses, secret), remote_backward=config.load().remote_backward))
        return _session


def on_start(hook):
    """Call ``hook(session)`` when a session starts, before the program's first op reaches it."""
    _start_hooks.append(hook)


def _install(session: Session):
    global _session, _pending_seed
    _session = session
    for hook in _start_hooks:
        hook(session)
    if _pending_seed is not None:
        session.manual_seed(_pending_seed)
        _pending_seed = None


def peek() -> Session | None:
    """The session if there is one; never starts one."""
    return _session


def close():
    """End the session: the job is released and the workers stop (also run at exit)."""
    global _session
    with _lock:
        session, _session = _session, None
    if session is not None:
        session.close()


def _after_fork_in_child():
    # The child shares the parent's sockets and job: it must neither use nor free them.
    global _session, _forked
    _forked = _forked or _session is not None
    _session = None


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close)


# --- the functions of the rest of the layer -------------------------------------------------------
def release_id(tid: int):
    session = _session  # at interpreter exit, or before any session, there is nothing to free
    if session is not None:
        session.release_id(tid)


def manual_seed(seed):
    global _pending_seed
    with _lock:
        if _session is None:
            _pending_seed = int(seed)  # seeds the device when it comes, as CUDA's lazy seeding does
            return
    _session.manual_seed(int(seed))


def synchronize():
    if _session is not None:
        _session.synchronize()


def memory_stats() -> dict:
    if _session is None:
        return {"allocated": 0, "peak": 0, "cap": 0}
    return _session.memory_stats()


def memory_snapshot() -> list[dict]:
    return [] if _session is None else _session.memory_snapshot()


def reset_peak():
    if _session is not None:
        _session.reset_peak()


def set_memory_fraction(fraction: float):
    current().set_memory_fraction(fraction)   # as CUDA's, it starts the device if it has not


def total_memory() -> int:
    return current().total_memory()


def gpu_telemetry() -> list[dict]:
    return current().gpu_telemetry()


def device_size_name() -> str:
    return current().device_size_name()


def get_rng_state() -> torch.Tensor:
    return current().get_rng_state()


def set_rng_state(state: torch.Tensor):
    current().set_rng_state(state)
