"""``torch.distributed`` in a program of one process on the virtual device.

Many single-GPU programs are written for ``torchrun``: launched with ``--nproc_per_node=1`` they
call ``dist.init_process_group("nccl")`` and wrap the model in ``DistributedDataParallel``. A CPU
build has no NCCL, and torch's default backend has none for the virtual device. Here:

- a backend naming NCCL (``"nccl"``, ``"cuda:nccl"``, ``"cpu:gloo,cuda:nccl"``), or none, is gloo,
  whose CPU collectives the program's host tensors use as under NCCL's setup they would;
  ``device_id`` naming the device (NCCL's eager communicator binding) is dropped;
  ``dist.get_backend()`` answers what the program would read on a GPU (code branches on
  ``== "nccl"``); torch's own code reads the truth through its module's function;
- a collective on device tensors (the c10d ops: ``all_reduce``, DDP's bucket all-reduce and its
  broadcast of the module's state ...) in a group of one process is what it is for one process:
  the tensors as they are, an all-gather's output a copy of its input, and a completed ``Work``.

The virtual device is one device of the size the job chose: a program parallelizes by that size,
not by processes. Collectives among several processes on the device fail with that said.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

from offload.device_mapping import is_virtual
from offload.dispatch import DISPATCHER

c10d = torch.ops.c10d


# What ``get_backend`` reads on a GPU machine where no backend was named.
CUDA_DEFAULT_BACKEND = "cpu:gloo,cuda:nccl"
# group name -> the backend the program named for it, where gloo stands in for NCCL
_named_backends: dict[str, str] = {}


def _names_nccl(backend) -> bool:
    return backend is None or "nccl" in str(backend).lower()


def _with_device_backend(original, returns_group: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = bound.arguments.get("backend")
        if named is None and returns_group:   # a new group takes the default group's backend
            named = str(dist.get_backend())
        stands_in = _names_nccl(named)   # gloo for the NCCL the program named
        if stands_in:
            bound.arguments["backend"] = "gloo"
        device_id = bound.arguments.get("device_id")
        if device_id is not None and is_virtual(device_id):   # an int is a CUDA ordinal
            del bound.arguments["device_id"]
        result = original(*bound.args, **bound.kwargs)
        group = result if returns_group else dist.distributed_c10d._get_default_group()
        if stands_in and isinstance(group, dist.ProcessGroup):
            _named_backends[group.group_name] = str(dist.Backend(named or CUDA_DEFAULT_BACKEND))
        return result
    return call


def _as_named(original):
    @functools.wraps(original)
    def get_backend(group=None):
        actual = original(group)
        group = dist.distributed_c10d._get_default_group() if group is None else group
        return dist.Backend(_named_backends.get(group.group_name, actual))
    return get_backend


def install():
    """Idempotent."""
    if getattr(dist.init_process_group, "_moai_backend", False):
        return
    for name, returns_group in (("init_process_group", False), ("new_group", True)):
        patched = _with_device_backend(getattr(dist, name), returns_group)
        patched._moai_backend = True
        setattr(dist, name, patched)
    dist.get_backend = _as_named(dist.get_backend)


# --- collectives on device tensors, in a group of one process ---------------------------------------
def _one_process(func, group) -> None:
    size = dist.ProcessGroup.unbox(group).size()
    if size != 1:
        raise NotImplementedError(
            f"{func}: collectives among {size} processes on the virtual cuda:0 device are not "
            "supported; the device's size (moreh-switch-model) is what parallelizes, run one process")


def _done(result):
    """A completed ``Work`` whose future holds ``result`` (a list of tensors), as torch's ops return it."""
    future = torch.futures.Future()
    future.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(future).boxed()


def _copy(outputs, inputs):
    for out, src in zip(outputs, inputs):
        if out is not src:
            out.copy_(src)


@DISPATCHER.rule(c10d.allreduce_.default, c10d.broadcast_.default)
def in_place_identity(func, args, kwargs):
    """All-reduce and broadcast over one process: the tensors as they are."""
    _one_process(func, args[1])
    return args[0], _done(args[0])


@DISPATCHER.rule(c10d.allreduce_coalesced_.default, c10d.reduce_.default)
def in_place_identity_work(func, args, kwargs):
    _one_process(func, args[1])
    return _done(args[0])


@DISPATCHER.rule(c10d.barrier.default)
def barrier(func, args, kwargs):
    _one_process(func, args[1])
    return _done([args[0]])


@DISPATCHER.rule(c10d.allgather_.default, c10d.gather_.default)
def gather_lists(func, args, kwargs):
    """Each input's output list holds the one process's copy (``outputs[0][k]`` for a gather)."""
    outputs, inputs = args[0], args[1]
    _one_process(func, args[2])
    _copy(outputs[0] if func is c10d.gather_.default else [o[0] for o in outputs], inputs)
    work = _done([t for row in outputs for t in row])
    return work if func is c10d.gather_.default else (outputs, work)


@DISPATCHER.rule(c10d.allgather_coalesced_.default)
def allgather_coalesced(func, args, kwargs):
    _one_process(func, args[2])
    _copy(args[0][0], args[1])
    return _done(list(args[0][0]))


@DISPATCHER.rule(c10d.reduce_scatter_.default, c10d.scatter_.default)
def scatter_lists(func, args, kwargs):
    """The one process's part of each input list is all of it."""
    outputs, inputs = args[0], args[1]
    _one_process(func, args[2])
    _copy(outputs, [row[0] for row in inputs])
    return outputs, _done(list(outputs))


@DISPATCHER.rule(c10d._allgather_base_.default, c10d._reduce_scatter_base_.default)
def into_tensor(func, args, kwargs):
    _one_process(func, args[2])
    _copy([args[0]], [args[1]])
    return args[0], _done([args[0]])


@DISPATCHER.rule(c10d.allgather_into_tensor_coalesced_.default, c10d.reduce_scatter_tensor_coalesced_.default,
                 c10d.alltoall_base_.default)
def into_tensors(func, args, kwargs):
    single = func is c10d.alltoall_base_.default   # one tensor each way, not lists
    outputs, inputs = ([args[0]], [args[1]]) if single else (args[0], args[1])
    _one_process(func, args[2])
    _copy(outputs, inputs)
    return _done(list(outputs))


@DISPATCHER.rule(c10d.alltoall_.default)
def alltoall(func, args, kwargs):
    _one_process(func, args[2])
    _copy(args[0], args[1])
    return args[0], _done(list(args[0]))


@DISPATCHER.rule(c10d.send.default, c10d.recv_.default, c10d.recv_any_source_.default)
def point_to_point(func, args, kwargs):
    _one_process(func, args[1])
    raise RuntimeError(f"{func}: a process cannot send to or receive from itself")
