"""Per-op behaviour of RemoteTensor: infer the result locally, stream the op, hand back a handle.

Generic path (every op without a rule): run the op on the inputs' meta tensors to learn the
outputs' shapes, strides, dtypes and aliasing, wrap each output in a RemoteTensor with a fresh id
(an output that *is* an input's meta -- in-place and ``out=`` ops -- returns that input's wrapper
and reuses its id), and append one op record to the session's stream. Nothing waits on the network.

Ops whose output shape depends on data (``nonzero``, boolean-mask indexing, ``unique``) have no
meta kernel; they run remotely at once and the result shapes are asked back (``describe``).

A few ops need their own behaviour (uploads, downloads, ``.item()``); they are registered with
``@DISPATCHER.rule(op, ...)``, which refuses a second rule for the same op.
"""
from __future__ import annotations

import torch

from daemons.wire import RemoteRef
from offload import session as sessions
from offload.tensor import RemoteTensor

aten = torch.ops.aten
META = torch.device("meta")


class Dispatcher:
    def __init__(self):
        self.rules: dict = {}
        self._names: dict = {}

    def rule(self, *ops):
        def register(fn):
            for op in ops:
                if op in self.rules:
                    raise RuntimeError(f"{op} already has a dispatch rule ({self.rules[op].__name__})")
                self.rules[op] = fn
            return fn
        return register

    def __call__(self, func, args, kwargs):
        rule = self.rules.get(func)
        if rule is not None:
            return rule(func, args, kwargs)
        return self.run(func, args, kwargs)

    def op_name(self, func) -> str:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = func.name()
        return name

    # --- the generic path ---------------------------------------------------------------------

    def run(self, func, args, kwargs):
        inputs: list = []
        meta_args, wire_args = split(args, inputs)
        meta_kwargs, wire_kwargs = split(kwargs, inputs)
        try:
            meta_out = func(*meta_args, **meta_kwargs)
        except NotImplementedError:
            return self.run_data_dependent(func, wire_args, wire_kwargs)
        except torch._subclasses.fake_tensor.DataDependentOutputException:
            return self.run_data_dependent(func, wire_args, wire_kwargs)
        if not isinstance(meta_out, torch.Tensor) and not func._schema.is_mutable and not _has_tensor(meta_out):
            return meta_out  # metadata queries (is_same_size ...) need no worker
        session = sessions.current()
        by_meta = {id(t._meta): t for t in inputs}
        out, out_spec = self.wrap(func, meta_out, by_meta, session)
        session.enqueue(self.op_name(func), wire_args, wire_kwargs, out_spec)
        return out

    def wrap(self, func, meta_out, by_meta: dict, session):
        """Wrappers and the record's ``out`` for the meta results of one op."""
        if isinstance(meta_out, torch.Tensor):
            same = by_meta.get(id(meta_out))
            if same is not None:
                if same.shape != meta_out.shape or same.stride() != meta_out.stride():
                    raise NotImplementedError(
                        f"{func} changes the shape of a cuda:0 tensor in place, which the virtual "
                        "device does not support; use the out-of-place form")
                return same, same._handle.id
            tid = session.new_id()
            return RemoteTensor(meta_out, tid), tid
        if isinstance(meta_out, (list, tuple)):
            pairs = [self.wrap(func, m, by_meta, session) for m in meta_out]
            return type(meta_out)(p[0] for p in pairs), [p[1] for p in pairs]
        return meta_out, None

    def run_data_dependent(self, func, wire_args, wire_kwargs):
        returns = func._schema.returns
        if not returns or any(str(r.type) != "Tensor" for r in returns):
            raise NotImplementedError(f"{func} cannot run on the virtual cuda:0 device "
                                      "(no shape rule and its results are not plain tensors)")
        session = sessions.current()
        ids = [session.new_id() for _ in returns]
        session.enqueue(self.op_name(func), wire_args, wire_kwargs, ids[0] if len(ids) == 1 else ids)
        outs = [RemoteTensor(_meta_like(shape, stride, offset, dtype), tid)
                for tid, (shape, stride, offset, dtype) in zip(ids, session.describe(ids))]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def factory(self, func, args, kwargs):
        """Allocation on the device (the PrivateUse1 kernels of offload/device.py)."""
        meta_kwargs = dict(kwargs, device=META)
        meta = func(*args, **meta_kwargs)
        session = sessions.current()
        tid = session.new_id()
        session.enqueue(self.op_name(func), list(args), kwargs, tid)
        return RemoteTensor(meta, tid)


def split(x, inputs: list):
    """(meta form, wire form) of an op argument; RemoteTensors found are appended to ``inputs``."""
    if isinstance(x, RemoteTensor):
        inputs.append(x)
        return x._meta, RemoteRef(x._handle.id)
    if isinstance(x, (list, tuple)):
        metas, wires = [], []
        for v in x:
            m, w = split(v, inputs)
            metas.append(m)
            wires.append(w)
        return (metas, wires) if isinstance(x, list) else (tuple(metas), tuple(wires))
    if isinstance(x, dict):
        metas, wires = {}, {}
        for k, v in x.items():
            metas[k], wires[k] = split(v, inputs)
        return metas, wires
    if isinstance(x, torch.device) and x.type != "cpu":
        return META, x
    return x, x


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (list, tuple)) and any(_has_tensor(v) for v in x)


def _meta_like(shape, stride, offset, dtype) -> torch.Tensor:
    span = 1 + offset + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)
    if any(s == 0 for s in shape):
        span = offset
    return torch.empty(span, dtype=dtype, device=META).as_strided(shape, stride, offset)


DISPATCHER = Dispatcher()


# --- transfers --------------------------------------------------------------------------------

def _target_device(kwargs) -> torch.device | None:
    device = kwargs.get("device")
    return None if device is None else torch.device(device)


@DISPATCHER.rule(aten._to_copy.default)
def to_copy(func, args, kwargs):
    target = _target_device(kwargs)
    src = args[0]
    if target is not None and target.type == "cpu" and isinstance(src, RemoteTensor):
        host = sessions.current().fetch(src._handle.id)
        dtype = kwargs.get("dtype")
        return host if dtype is None or dtype == host.dtype else host.to(dtype)
    return DISPATCHER.run(func, args, kwargs)


@DISPATCHER.rule(aten.copy_.default)
def copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    if isinstance(dst, RemoteTensor) and isinstance(src, RemoteTensor):
        return DISPATCHER.run(func, args, kwargs)
    if isinstance(dst, RemoteTensor):
        upload(dst, src, non_blocking)
        return dst
    dst.copy_(sessions.current().fetch(src._handle.id))
    return dst


def upload(dst: RemoteTensor, src: torch.Tensor, non_blocking: bool):
    session = sessions.current()
    src = src.detach()
    exact = (src.shape == dst.shape and src.dtype == dst.dtype and src.is_contiguous()
             and dst._meta.is_contiguous())
    if exact and session.drop_fresh_allocation(dst._handle.id):
        # ``.to(device)`` is empty + copy_: the tensor can simply arrive as the allocation.
        session.put(dst._handle.id, src, wait_sent=not non_blocking)
        return
    staging = session.new_id()
    session.put(staging, src, wait_sent=not non_blocking)
    session.enqueue("aten::copy_", [RemoteRef(dst._handle.id), RemoteRef(staging)], {}, dst._handle.id)
    session.release_id(staging)


@DISPATCHER.rule(aten._local_scalar_dense.default)
def local_scalar_dense(func, args, kwargs):
    return sessions.current().fetch(args[0]._handle.id).item()
