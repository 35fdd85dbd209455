"""An error on autograd's device thread, of the front's code or of a program's backward hook,
raised where the backward was called.

torch runs a backward's device ops on a thread of its own. On torch 2.13 a Python exception
cannot leave that thread from an op called by a C++ gradient formula: unwinding past the engine's
stream guard calls the device guard's Python ``type_`` with the error still pending, which fails
inside ``noexcept`` C++, and the whole program ends in ``std::terminate`` ("terminate called
without an active exception"). So such an op that fails answers ``None`` instead, an undefined
tensor, which the C++ code using it refuses with an error of its own (no Python error pending,
so it unwinds cleanly); the op's exception is held and raised by the engine's caller in its
place, once the backward has returned or failed: ``backward()`` or ``torch.autograd.grad``
raises the op's own exception, as it would natively.

A program's hooks that the engine calls from C++ (on a tensor, a gradient's node, a parameter's
accumulated gradient, and through them a module's backward hooks) unwind the same way when they
raise: each is registered wrapped, so that its exception is held too and the hook changes nothing
(it answers ``None``); the rest of the backward runs, and ``backward()`` raises the hook's error.
"""
from __future__ import annotations

import functools
import threading

import torch

_lock = threading.Lock()
_callers: dict[int, int] = {}        # thread ident -> engine runs it is waiting on (nested ones)
_held: list[Exception] = []          # the first error held, for the run that waits on it


def install():
    """Raise held errors from every run of the engine (``backward()``, ``autograd.grad``), and
    hold a failing hook's. Before anything else wraps the hook registrations (remote_backward)."""
    original = torch.autograd._engine_run_backward
    if getattr(original, "_moai_raises_held", False):
        return
    for name in ("register_hook", "register_post_accumulate_grad_hook"):
        _hooks_held_on_failure(torch.Tensor, name)
    _hooks_held_on_failure(torch.autograd.function._HookMixin, "_register_hook", static=True)

    @functools.wraps(original)
    def run(*args, **kwargs):
        me = threading.get_ident()
        with _lock:
            _callers[me] = _callers.get(me, 0) + 1
        try:
            result = original(*args, **kwargs)
        except Exception:
            _raise_held()
            raise
        finally:
            with _lock:
                _callers[me] -= 1
                if not _callers[me]:
                    del _callers[me]
        _raise_held()
        return result

    run._moai_raises_held = True
    torch.autograd._engine_run_backward = run


def _hooks_held_on_failure(cls, name: str, static: bool = False):
    """``cls.name(..., hook)`` registers ``hook`` wrapped: its exception, on the device thread,
    is held and it answers ``None``."""
    register = getattr(cls, name)

    @functools.wraps(register)
    def registering(*args, **kwargs):
        if "hook" in kwargs:
            kwargs["hook"] = _held_on_failure(kwargs["hook"])
        else:
            args = (*args[:-1], _held_on_failure(args[-1]))
        return register(*args, **kwargs)

    setattr(cls, name, staticmethod(registering) if static else registering)


def _held_on_failure(hook):
    @functools.wraps(hook)
    def run(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except Exception as e:
            if not held(e):
                raise
            return None
    return run


def held(error: Exception) -> bool:
    """Hold ``error`` if this is autograd's device thread during a run ``install`` wraps: its
    raiser then answers ``None`` instead of raising. False elsewhere: raise it there."""
    if torch._C._current_graph_task_id() == -1:
        return False
    with _lock:
        if not _callers or threading.get_ident() in _callers:
            return False
        if not _held:
            _held.append(error)
    return True


def _raise_held():
    with _lock:
        error = _held.pop() if _held else None
    if error is not None:
        raise error
