"""The program's changes to torch's device settings, forwarded to the workers.

``torch.backends.cudnn.benchmark = True``, ``torch.set_float32_matmul_precision("high")``,
``torch.use_deterministic_algorithms(True)`` ... change how the device computes: in the front
process they change nothing that matters (it computes nothing). Each change the program makes to
one of the settings daemons/worker/torch_settings.py names is made here as usual and forwarded as
a ``moai::setting`` record, in order with the ops around it. A change made before the device is
first used waits for the session; a new session gets all the program made so far, the latest
of each.
"""
from __future__ import annotations

import functools
import os

import torch

from daemons.worker.torch_settings import (ATTRIBUTES, CUBLAS_WORKSPACE_CONFIG, ENVIRONMENT, FUNCTIONS,
                                           SETTING_OP, target_object)
from offload import session as sessions

# (target, name) -> (args, kwargs) of the program's latest change, in the order they were made.
_changes: dict[tuple[str, str], tuple[list, dict]] = {}
# The objects whose attributes are settings, by id (instances of a class may be others too:
# torch.backends.mkldnn.matmul's class is torch.backends.cudnn.conv's), with their paths.
_targets: dict[int, str] = {}


def _record(target: str, name: str, args: list, kwargs: dict):
    if target == "torch" and name == "use_deterministic_algorithms":
        workspace = os.environ.get(CUBLAS_WORKSPACE_CONFIG)
        sent = _changes.get((ENVIRONMENT, CUBLAS_WORKSPACE_CONFIG))
        if workspace is not None and sent != ([workspace], {}):
            _record(ENVIRONMENT, CUBLAS_WORKSPACE_CONFIG, [workspace], {})
    _changes.pop((target, name), None)
    _changes[(target, name)] = (args, kwargs)
    session = sessions.peek()
    if session is not None:
        session.enqueue(SETTING_OP, [target, name, args, kwargs], {}, None)


def _send_all(session):
    for (target, name), (args, kwargs) in _changes.items():
        session.enqueue(SETTING_OP, [target, name, args, kwargs], {}, None)


def _forwarding_function(name: str, original):
    @functools.wraps(original)
    def forwarding(*args, **kwargs):
        result = original(*args, **kwargs)   # torch checks the arguments first
        _record("torch", name, list(args), kwargs)
        return result
    return forwarding


def _forwarding_setattr(original):
    def __setattr__(self, name, value):
        original(self, name, value)
        target = _targets.get(id(self))
        if target is not None and name in ATTRIBUTES[target]:
            _record(target, name, [getattr(self, name)], {})   # as torch keeps it: a plain value
    return __setattr__


def install():
    """Idempotent."""
    if _targets:
        return
    for target in ATTRIBUTES:
        _targets[id(target_object(target))] = target
    for cls in {type(target_object(target)) for target in ATTRIBUTES}:
        cls.__setattr__ = _forwarding_setattr(cls.__setattr__)
    for name in FUNCTIONS:
        setattr(torch, name, _forwarding_function(name, getattr(torch, name)))
    sessions.on_start(_send_all)
