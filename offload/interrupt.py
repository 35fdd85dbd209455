"""Ctrl-C in a front process lands where the program can take it.

Python raises KeyboardInterrupt in whichever code runs when it handles the signal: between two
instructions of any Python function, or inside a C call that checks for signals. In a front that
is often where the exception is lost or fatal:

- in a finalizer (a device tensor's ``Handle.__del__``, pyzmq's frame deallocation) it is printed
  as "Exception ignored" and dropped: the Ctrl-C is lost and the program trains on;
- under torch's ``noexcept`` C++ it aborts the process ("terminate called without an active
  exception") before ``atexit`` releases the job, and the master fails the job when its
  heartbeats stop. Autograd asks the PrivateUse1 device guard for a stream there, for every op it
  records; pybind11 looks the guard's Python method up with ``PyObject_Str``, which runs signal
  handlers, and the exception then crosses the ``noexcept``.

So the handler holds the interrupt while the main thread is in the layer's code or stopped at a
call (which may be one of those C paths) and has it delivered again a few milliseconds later, as a
second Ctrl-C would be, until it lands between two instructions of the program's own code or in
one of the layer's blocking waits (a worker's reply, the job queue), which take it at once. A
program that installs its own SIGINT handler keeps it: this one is installed only over Python's
default, when the process first takes a device.
"""
from __future__ import annotations

import dis
import os
import signal
import threading
import time
import types
from pathlib import Path

import torch.utils.backend_registration

import daemons
import offload
from daemons import wire
from offload.job import Job

REDELIVER_S = 0.002
# A held interrupt is raised wherever it lands after this long: a program sitting in a long C
# call (a sleep, a queue's get) or a layer stuck in its own code must stay interruptible, at the
# risk the hold exists to avoid. A training loop gives it a safe place within milliseconds.
HOLD_AT_MOST_S = 0.5

# The device guard torch runs from C++ is the layer's, though its Python lives in torch.
_LAYER_FILES = (str(Path(offload.__file__).parent) + os.sep, str(Path(daemons.__file__).parent) + os.sep,
                torch.utils.backend_registration.__file__)
# The layer's blocking waits: a worker's reply (every sync point), the job queue.
_WAITS = frozenset(f.__code__ for f in (wire.recv_within, wire.recv_polling, Job._wait_running))
_CALLS = frozenset(dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX", "PRECALL") if name in dis.opmap)

_held_since: float | None = None
_redelivery_due = False
_pipe: tuple[int, int] | None = None  # the redelivery thread reads, the handler writes


def install():
    """Take SIGINT in this process unless the program handles it itself (idempotent)."""
    global _pipe
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # the program's own handler, or ours already
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal is for the main thread only; the first device use was elsewhere
    _pipe = os.pipe()
    # Started here, not when an interrupt is held: starting a thread takes threading's locks,
    # which the interrupted code may hold.
    threading.Thread(target=_redeliver, args=(_pipe[0],), daemon=True, name="moai-sigint").start()
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum, frame):
    global _held_since, _redelivery_due
    now = time.monotonic()
    if _held_since is None:
        _held_since = now
    if _lands_here(frame) or now - _held_since > HOLD_AT_MOST_S:
        _held_since = None
        raise KeyboardInterrupt
    if not _redelivery_due:  # one at a time: a second Ctrl-C meanwhile joins the held one
        _redelivery_due = True
        os.write(_pipe[1], b"\0")  # no lock to take: the interrupted code may hold any


def _lands_here(frame: types.FrameType | None) -> bool:
    """True in the program's own code between two instructions, or in one of the layer's waits;
    False in the layer's code or inside a C call the program made."""
    innermost = frame
    while frame is not None:
        code = frame.f_code
        if code in _WAITS:
            return True
        if code.co_filename.startswith(_LAYER_FILES):
            return False
        frame = frame.f_back
    # Python also runs handlers from inside C calls (PyObject_Str does): one inside a torch op
    # may be pybind11 asking the layer's guard for a stream from ``noexcept`` C++, where the
    # exception aborts the process. A frame stopped at a call cannot tell which C it waits in.
    return innermost is None or innermost.f_code.co_code[innermost.f_lasti] not in _CALLS


def _redeliver(read_end: int):
    global _redelivery_due
    main = threading.main_thread().ident
    while os.read(read_end, 1):
        time.sleep(REDELIVER_S)
        _redelivery_due = False
        if _held_since is not None:
            # To the main thread: a blocking receive there returns EINTR and runs the handler.
            signal.pthread_kill(main, signal.SIGINT)


def _after_fork_in_child():
    # A child (a DataLoader worker) has no redelivery thread, and the pipe's read end is the
    # parent's thread: give it Python's own handling back.
    global _pipe, _held_since, _redelivery_due
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in _pipe:
            os.close(fd)
        _pipe, _held_since, _redelivery_due = None, None, False


os.register_at_fork(after_in_child=_after_fork_in_child)
