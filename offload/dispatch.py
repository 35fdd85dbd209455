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

import functools
import re
import threading

import torch

from daemons.wire import RemoteRef
from daemons.worker import conv_layout, layout
from daemons.worker.executor import runnable
from offload import generators, parameter_swap, torchscript, unsupported
from offload import session as sessions
from offload import sync_debug
from offload.device import DEVICE
from offload.tensor import VISIBLE_DEVICE, DetachedHandle, LeafHandle, RemoteTensor

aten = torch.ops.aten
META = torch.device("meta")
# Ops whose meta kernels lay results out unlike the devices' kernels (daemons/worker/conv_layout.py).
_LAID_OUT_AS_ON_CUDA = (aten.convolution.default, aten.convolution_backward.default)
# The C functions themselves: device_mapping wraps torch.empty / torch.empty_strided to map
# ``device="cuda"``, a Python call per op that meta allocations here never need.
_empty = torch._C._VariableFunctions.empty
_empty_strided = torch._C._VariableFunctions.empty_strided


class OpInfo:
    """What the per-op path needs to know of an op, worked out at its first call."""

    __slots__ = ("id", "name", "rule", "composite", "scalar_positions", "scalar_names", "one_device")

    def __init__(self, func, rule):
        self.id, self.name, self.rule = id(func), func.name(), rule
        self.composite = torch._C._dispatch_has_kernel_for_dispatch_key(
            self.name, torch._C.DispatchKey.CompositeImplicitAutograd)
        self.scalar_positions, self.scalar_names = _scalar_arguments(func)
        self.one_device = func._schema.name in _ONE_DEVICE


class Dispatcher:
    def __init__(self):
        self.rules: dict = {}
        # id(op) -> OpInfo: an OpOverload hashes in Python, too slow for a lookup per op; ops
        # live as long as the process, so their ids are stable keys.
        self._ops: dict[int, OpInfo] = {}

    def rule(self, *ops):
        def register(fn):
            for op in ops:
                if op in self.rules:
                    raise RuntimeError(f"{op} already has a dispatch rule ({self.rules[op].__name__})")
                self.rules[op] = fn
            self._ops.clear()
            return fn
        return register

    def info(self, func) -> OpInfo:
        info = self._ops.get(id(func))
        if info is None:
            info = self._ops[id(func)] = OpInfo(func, self.rules.get(func))
            if info.rule is None and _QUANTIZING.match(info.name):
                info.rule = _quantizing
            elif info.rule is None and not info.composite and not runnable(info.name):
                info.rule = _foreign
        return info

    def __call__(self, func, args, kwargs):
        info = self._ops.get(id(func)) or self.info(func)
        if info.rule is not None:
            return info.rule(func, args, kwargs)
        if info.composite:
            # Such an op reaches here whole only with autograd's keys excluded (inference_mode):
            # elsewhere torch decomposes it above them, and its parts come one by one.
            out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return self.run(func, args, kwargs, info)

    def op_name(self, func) -> str:
        return self.info(func).name

    # --- the generic path ---------------------------------------------------------------------

    def run(self, func, args, kwargs, info: OpInfo | None = None):
        info = info or self.info(func)
        wire_args, wire_kwargs, inputs, key = op_arguments(info, args, kwargs)
        cached = SHAPES.get(key)
        if cached is not None:
            template, fresh = cached
            session = sessions.current()
            if fresh:
                session.allocate(info.name, fresh)
            out, out_spec = from_template(template, inputs, session)
        else:
            if info.one_device:
                _check_one_device(func, args, kwargs)
            meta_args = meta_form(args)
            try:
                meta_out = _META_KERNELS.get(func, func)(*meta_args, **meta_form(kwargs))
            except NotImplementedError:
                return self.run_data_dependent(func, wire_args, wire_kwargs)
            except torch._subclasses.fake_tensor.DataDependentOutputException:
                return self.run_data_dependent(func, wire_args, wire_kwargs)
            except RuntimeError as e:
                raise _as_on_the_device(e) from None
            if func._schema.is_mutable:
                for t in inputs:  # resize_, set_, t_ ... may have changed what _desc says
                    t._desc = None
            elif not isinstance(meta_out, torch.Tensor) and not _has_tensor(meta_out):
                return meta_out  # metadata queries (is_same_size ...) need no worker
            if func in _LAID_OUT_AS_ON_CUDA:
                meta_out = conv_layout.laid_out(func, meta_out, meta_args)
            fresh = SHAPES.learn(key, info, args, kwargs, inputs, meta_out)
            session = sessions.current()
            if fresh:
                session.allocate(info.name, fresh)
            by_meta = {id(t._meta): t for t in inputs}
            out, out_spec = self.wrap(func, meta_out, by_meta, session)
        session.enqueue(info.name, wire_args, wire_kwargs, out_spec)
        return out

    def wrap(self, func, meta_out, by_meta: dict, session):
        """Wrappers and the record's ``out`` for the meta results of one op."""
        if isinstance(meta_out, torch.Tensor):
            _check_layout(func, meta_out.layout)
            same = by_meta.get(id(meta_out))
            if same is not None:
                if same.shape != meta_out.shape or same.stride() != meta_out.stride():
                    _restride(func, same, meta_out)
                return same, same._handle.id
            tid = session.new_id()
            return RemoteTensor(meta_out, tid), tid
        if isinstance(meta_out, (list, tuple)):
            pairs = [self.wrap(func, m, by_meta, session) for m in meta_out]
            return type(meta_out)(p[0] for p in pairs), [p[1] for p in pairs]
        return meta_out, None

    def run_data_dependent(self, func, wire_args, wire_kwargs):
        if _NOT_DENSE.match(func._schema.name):
            # No meta kernel, so the layout is not known here: without this the worker would fail
            # to store the result, reported at the next sync.
            _check_layout(func, None)
        returns = func._schema.returns
        if not returns or any(str(r.type) != "Tensor" for r in returns):
            raise NotImplementedError(f"{func} cannot run on the virtual cuda:0 device "
                                      "(no shape rule and its results are not plain tensors)")
        sync_debug.check()
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
        _check_layout(func, meta.layout)
        session, name = sessions.current(), self.op_name(func)
        session.allocate(name, meta.untyped_storage().nbytes())
        tid = session.new_id()
        session.enqueue(name, wire_form(list(args), []), wire_form(kwargs, []), tid)
        return RemoteTensor(meta, tid)


def _baddbmm_meta(self, batch1, batch2, out_dtype, beta=1, alpha=1, **out):
    args = [t.to(out_dtype) for t in (self, batch1, batch2)]
    return (aten.baddbmm.out if out else aten.baddbmm.default)(*args, beta=beta, alpha=alpha, **out)


# Where torch's own meta kernel is wrong: baddbmm's decomposition, registered for every overload,
# reads the .dtype overloads' out_dtype as beta (CUDA's kernels run them).
_META_KERNELS = dict.fromkeys((aten.baddbmm.dtype, aten.baddbmm.dtype_out), _baddbmm_meta)


def _foreign(func, args, kwargs):
    """An op of a library of its own (``torch.library.custom_op``'s, an extension's), which no
    worker runs. One implemented once for every device in torch's ops (a CompositeExplicitAutograd
    kernel: a Python custom op, such as the chunked ``F.linear_cross_entropy``'s) runs here, its
    ops streamed as any others; one with a kernel per device (CUDA code) is refused at once."""
    everywhere = torch._C.DispatchKey.CompositeExplicitAutograd
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), everywhere):
        return func._op_dk(everywhere, *args, **kwargs)
    raise unsupported.not_supported(f"the operator {func.name()} (a library's own, with per-device "
                                    "kernels)")


# Ops whose CUDA kernels take every tensor on the device, where their meta kernels check nothing:
# a host tensor among their arguments would run (sent with every record) where CUDA raises.
_ONE_DEVICE = frozenset("aten::" + name for name in (
    "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv", "dot", "vdot", "convolution",
    "_convolution", "index_select", "gather", "scatter", "scatter_add", "scatter_reduce", "index_add",
    "index_copy", "embedding", "embedding_dense_backward", "_embedding_bag", "take"))


def _check_one_device(func, args, kwargs):
    """CUDA's check (c10's check_and_update_common_device): the first tensor argument's device is
    the one the others must be on."""
    common = None
    for name, value in [*zip((a.name for a in func._schema.arguments), args), *kwargs.items()]:
        if not isinstance(value, torch.Tensor):
            continue
        device = VISIBLE_DEVICE if isinstance(value, RemoteTensor) else value.device
        if common is None:
            common = device
        elif device != common:
            raise RuntimeError(f"{_two_devices(common, device)} (when checking argument for argument "
                               f"{name} in method {func})")


def _two_devices(first, second) -> str:
    """CUDA's words for tensors of two devices given to one op."""
    return f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}!"


# Ops whose results are quantized tensors: their meta kernels describe float tensors, so the front
# took the worker's quantized result for a float one (wrong dtype, then a reply it cannot decode).
_QUANTIZING = re.compile(r"aten::(quantize_per_\w+|_make_per_\w+_quantized_tensor|_empty_\w*affine_quantized|"
                         r"empty_quantized)")
_QUANTIZED_REFUSAL = ("quantized tensors are not supported on the virtual cuda:0 device; quantize on the "
                     "CPU, or use fake quantization (torch.fake_quantize_per_tensor_affine ...), which "
                     "keeps float tensors")


def _quantizing(func, args, kwargs):
    raise NotImplementedError(f"{func}: {_QUANTIZED_REFUSAL}")


def _as_on_the_device(e: RuntimeError) -> RuntimeError:
    """A meta kernel's error as the program's device would word it: the inputs it checked were
    the device tensors' metas ("Expected all tensors to be on the same device, but found at least
    two devices, meta and cpu!" is CUDA's "cuda:0 and cpu")."""
    message = str(e)
    if type(e) is not RuntimeError or "meta" not in message:
        return e
    # torch's reference kernels word it so, either way round; CUDA's TensorIterator as below.
    other = re.fullmatch(r"Tensor on device (\S+) is not on the expected device meta!", message)
    if other:
        return type(e)(_two_devices(VISIBLE_DEVICE, other.group(1)))
    other = re.fullmatch(r"Tensor on device meta is not on the expected device (\S+)!", message)
    if other:
        return type(e)(_two_devices(other.group(1), VISIBLE_DEVICE))
    return type(e)(re.sub(r"\bmeta\b", str(VISIBLE_DEVICE), message))


# Ops whose results are sparse, MKL-DNN or nested tensors; they have no meta kernel.
_NOT_DENSE = re.compile(r"aten::(_?to_sparse\w*|_?sparse_\w*|to_mkldnn|mkldnn_\w*|_nested_\w*)")


def _check_layout(func, layout: torch.layout | None):
    """Only dense tensors live on the virtual device: the workers' tables, the wire's tensor
    form and the shape inference all hold strided tensors."""
    if layout != torch.strided:
        kind = f"{layout} tensors" if layout is not None else "its results, not dense tensors,"
        raise NotImplementedError(f"{func}: {kind} are not supported on the virtual cuda:0 device; "
                                  "keep them on the CPU or use dense tensors (to_dense())")


def _restride(func, wrapper: RemoteTensor, meta: torch.Tensor):
    """An in-place view op (``transpose_``, ``t_``, ``squeeze_`` ...; torch's GRU does
    ``transpose_`` on its output for batch_first) changed the input's meta: give its wrapper the
    same sizes and strides (the worker changes its own tensor by the same op)."""
    wrapper._desc = None
    try:
        with torch._C._DisableTorchDispatch():
            aten.as_strided_.default(wrapper, meta.shape, meta.stride(), meta.storage_offset())
    except RuntimeError:
        raise NotImplementedError(
            f"{func} changes the shape of a cuda:0 tensor in place beyond its storage, which the "
            "virtual device does not support; use the out-of-place form") from None


def wire_form(x, inputs: list):
    """An op argument as its record carries it; the RemoteTensors in it are appended to ``inputs``."""
    if isinstance(x, RemoteTensor):
        inputs.append(x)
        return x._handle.ref
    kind = type(x)
    if kind is list or kind is tuple:
        wires = [wire_form(v, inputs) for v in x]
        return wires if kind is list else tuple(wires)
    if kind is dict:
        return {k: wire_form(v, inputs) for k, v in x.items()}
    if kind is torch.device and x.type == DEVICE.type:
        # Named as the program sees it: a worker parses "cuda:0" on any torch build and takes
        # any device in a record for its own, so it needs no name for this one.
        return VISIBLE_DEVICE
    if isinstance(x, torch._C.Generator):
        return generators.wire_ref(x)
    return x


def meta_form(x):
    """An op argument as the meta kernel takes it: tensors' metas, the device as ``meta``."""
    if isinstance(x, RemoteTensor):
        return x._meta
    kind = type(x)
    if kind is list or kind is tuple:
        metas = [meta_form(v) for v in x]
        return metas if kind is list else tuple(metas)
    if kind is dict:
        return {k: meta_form(v) for k, v in x.items()}
    if kind is torch.device and x.type != "cpu":
        return META
    return x


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (list, tuple)) and any(_has_tensor(v) for v in x)


def _meta_like(shape, stride, offset, dtype) -> torch.Tensor:
    span = 1 + offset + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)
    if any(s == 0 for s in shape):
        span = offset
    return _empty(span, dtype=dtype, device=META).as_strided(shape, stride, offset)


# --- the shape cache --------------------------------------------------------------------------
# torch's meta kernels are mostly Python reference code: 40-80 us for a small op, ~1 ms for a
# _foreach op, while a training step repeats the same ops on the same shapes. The outputs of an
# op are a function of its input metadata (shapes, strides, offsets, dtypes, which inputs share
# storage or are the same tensor), its other arguments and the default dtype, so they are
# remembered under that key and rebuilt without the kernel: a fresh output as an empty_strided
# meta tensor, a view as as_strided on the meta of the input it aliases (so later in-place ops
# through it still alias), an in-place result as that very input's meta.

_FRESH, _SELF, _VIEW, _SEQ, _CONST = range(5)
_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format})
_TENSOR = object()  # an input's place in the key; its metadata follows in input order


class _Uncacheable(Exception):
    pass


class ShapeCache:
    # Bounded for programs whose shapes keep changing; refilling costs only the misses.
    MAX_ENTRIES = 16384

    def __init__(self):
        self.entries: dict = {}
        self.hits = self.misses = 0

    def get(self, key):
        if key is None:
            return None
        template = self.entries.get(key)
        if template is None:
            self.misses += 1
        else:
            self.hits += 1
        return template

    def learn(self, key, info: OpInfo, args, kwargs, inputs, meta_out) -> int:
        """Remember how the op's results are made from its inputs, and the bytes of the new
        storages among them (returned)."""
        metas = [t._meta for t in inputs]
        storages: dict = {}
        for i, m in enumerate(metas):
            storages.setdefault(m.untyped_storage()._cdata, i)
        fresh = _fresh_bytes(meta_out, set(storages))
        # An op that changed an input's metadata (resize_, squeeze_ ...) is not a function of the key.
        if key is None or op_arguments(info, args, kwargs)[3] != key:
            return fresh
        try:
            template = _template(meta_out, metas, storages)
        except _Uncacheable:
            return fresh
        if len(self.entries) >= self.MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (template, fresh)
        return fresh


def _fresh_bytes(out, known: set) -> int:
    """Bytes of the storages of ``out``'s tensors that are none of ``known`` (its inputs')."""
    if isinstance(out, torch.Tensor):
        if out.layout != torch.strided:
            return 0   # refused by Dispatcher.wrap (no storage to ask)
        storage = out.untyped_storage()
        if storage._cdata in known:
            return 0
        known.add(storage._cdata)
        return storage.nbytes()
    if isinstance(out, (list, tuple)):
        return sum(_fresh_bytes(o, known) for o in out)
    return 0


def op_arguments(info: OpInfo, args, kwargs) -> tuple[list, dict, list, tuple | None]:
    """One pass over an op's arguments: the record's args and kwargs, the RemoteTensors among them
    in order (the op's inputs), and the op's shape-cache key, None for an op the cache must not
    answer (other tensors, generators, complex or negative-bit inputs).

    The key is the op, the default dtype, each argument's key (``_arg_key``; a Scalar's type
    only, ``_scalar_key``), and each input's metadata with the first input it is or shares
    storage with. Tensors and plain numbers, most of any op's arguments, are handled inline."""
    inputs: list = []
    wire_args = []
    arg_keys = []
    positions = info.scalar_positions
    cacheable = True
    for i, a in enumerate(args):
        kind = type(a)
        if kind is RemoteTensor:
            inputs.append(a)
            wire_args.append(a._handle.ref)
            arg_keys.append(_TENSOR)
        elif kind is int or kind is float or kind is bool:
            wire_args.append(a)
            arg_keys.append(kind if i in positions else (kind, a))
        else:
            wire_args.append(wire_form(a, inputs))
            if cacheable:
                try:
                    arg_keys.append(_scalar_key(a) if i in positions else _arg_key(a))
                except _Uncacheable:
                    cacheable = False
    wire_kwargs = wire_form(kwargs, inputs) if kwargs else kwargs
    if not cacheable:
        return wire_args, wire_kwargs, inputs, None
    try:
        described = []
        objects: dict = {}
        storages: dict = {}
        for i, t in enumerate(inputs):
            d = t._desc
            if d is None:
                d = t._desc = _describe(t._meta)
            described.append((d[0], objects.setdefault(id(t), i), storages.setdefault(d[1], i)))
        names = info.scalar_names
        kwarg_keys = tuple([(k, _scalar_key(v) if k in names else _arg_key(v)) for k, v in kwargs.items()])
    except _Uncacheable:
        return wire_args, wire_kwargs, inputs, None
    return wire_args, wire_kwargs, inputs, (info.id, torch.get_default_dtype(), tuple(arg_keys), kwarg_keys,
                                            tuple(described))


def _describe(m: torch.Tensor) -> tuple:
    """(metadata, storage) of a meta tensor, kept on its wrapper as ``_desc`` until an op that
    may change them runs uncached (``Dispatcher.run``)."""
    if m.dtype.is_complex or m.is_neg():
        raise _Uncacheable
    return (m.shape, m.stride(), m.storage_offset(), m.dtype), m.untyped_storage()._cdata


def _arg_key(x):
    kind = type(x)
    if kind in _PLAIN:
        return kind, x  # the type too: 1, 1.0 and True promote differently
    if kind is list or kind is tuple or kind is torch.Size:
        return kind, tuple(_arg_key(v) for v in x)
    if isinstance(x, RemoteTensor):
        return _TENSOR
    raise _Uncacheable


# A Scalar argument's value does not change the outputs' metadata, only its type does (torch
# promotes by category): so a learning rate or a bias correction that changes every step (AdamW's
# _foreach_addcdiv_.ScalarList) still hits. Except where the values are the size: arange, range.
_SIZED_BY_SCALARS = frozenset({"aten::arange", "aten::range"})


def _is_scalar_type(t) -> bool:
    if isinstance(t, (torch.OptionalType, torch.ListType)):
        t = t.getElementType()
    return isinstance(t, torch.NumberType)


def _scalar_arguments(func) -> tuple[frozenset, frozenset]:
    """(positions, keyword names) of ``func``'s Scalar, Scalar? and Scalar[] arguments."""
    schema = func._schema
    scalars = [] if schema.name in _SIZED_BY_SCALARS else [
        (i, a.name) for i, a in enumerate(schema.arguments) if _is_scalar_type(a.type)]
    return frozenset(i for i, _ in scalars), frozenset(n for _, n in scalars)


def _scalar_key(x):
    kind = type(x)
    if kind is bool or kind is int or kind is float:
        return kind
    if kind is list or kind is tuple:
        return kind, tuple(_scalar_key(v) for v in x)
    return _arg_key(x)


def _template(out, metas: list, storages: dict):
    if isinstance(out, torch.Tensor):
        for k, m in enumerate(metas):
            if out is m:
                return _SELF, k
        if out.layout != torch.strided or out.dtype.is_complex or out.is_neg():
            raise _Uncacheable
        shape, stride, offset = tuple(out.shape), out.stride(), out.storage_offset()
        k = storages.get(out.untyped_storage()._cdata)
        if k is None:
            return _FRESH, shape, stride, offset, out.dtype
        if metas[k].dtype != out.dtype:
            raise _Uncacheable  # a dtype view: as_strided cannot rebuild it
        return _VIEW, k, shape, stride, offset
    if isinstance(out, (list, tuple)):
        return _SEQ, type(out), tuple(_template(o, metas, storages) for o in out)
    if out is None or type(out) in (bool, int, float):
        return _CONST, out
    raise _Uncacheable


def from_template(template, inputs: list, session):
    """Wrappers and the record's ``out`` of a cached op, as ``Dispatcher.wrap`` makes them from
    the meta kernel's results: a fresh output gets a new id and an empty meta, a view a meta
    aliasing its input's (so later in-place ops through it still alias), an in-place result is
    that very input. No op that changes an input's metadata is cached (``ShapeCache.learn``), so
    an input comes back as it went in."""
    kind = template[0]
    if kind == _FRESH:
        _, shape, stride, offset, dtype = template
        meta = _meta_like(shape, stride, offset, dtype) if offset else \
            _empty_strided(shape, stride, dtype=dtype, device=META)
        tid = session.new_id()
        return RemoteTensor.described(meta, shape, stride, offset, dtype, meta.untyped_storage()._cdata,
                                      tid), tid
    if kind == _SELF:
        same = inputs[template[1]]
        return same, same._handle.id
    if kind == _VIEW:
        _, k, shape, stride, offset = template
        base = inputs[k]
        meta = base._meta
        tid = session.new_id()
        # The base's description is there: the shape cache's key, which found this template, has it.
        return RemoteTensor.described(meta.as_strided(shape, stride, offset), shape, stride, offset,
                                      meta.dtype, base._desc[1], tid), tid
    if kind == _SEQ:
        pairs = [from_template(t, inputs, session) for t in template[2]]
        return template[1](p[0] for p in pairs), [p[1] for p in pairs]
    return template[1], None


SHAPES = ShapeCache()
DISPATCHER = Dispatcher()
RemoteTensor.dispatcher = DISPATCHER  # before any RemoteTensor exists: only this module makes them


# --- transfers --------------------------------------------------------------------------------

def _target_device(kwargs) -> torch.device | None:
    device = kwargs.get("device")
    return None if device is None else torch.device(device)


@DISPATCHER.rule(aten._to_copy.default)
def to_copy(func, args, kwargs):
    target = _target_device(kwargs)
    src = args[0]
    if target is not None and target.type == "cpu" and isinstance(src, RemoteTensor):
        sync_debug.check()
        host = sessions.current().fetch(src._handle.id)
        if kwargs.get("memory_format") in (None, torch.preserve_format):
            host = layout.laid_out_like(host, src)   # as CUDA's .cpu() lays it out (preserve_format)
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
        if src.shape != dst.shape:
            # torch's own check and message, at the call (the worker would find it at the next sync)
            torch.empty(dst.shape, device=META).copy_(torch.empty(src.shape, device=META))
        upload(dst, src, non_blocking)
        return dst
    sync_debug.check()
    dst.copy_(sessions.current().fetch(src._handle.id))
    return dst


# Set while ``Module._apply`` (``.to``/``.cuda``/``.half`` ...) runs in this thread: the tensors it
# uploads are the model's own state, not a batch.
_moving_module = threading.local()


def upload_hint(src: torch.Tensor) -> str:
    """The ``put`` hint (docs/PARALLELISM.md) for an upload: where a multi-GPU job's workers place it.

    Only a hint: the workers' results do not depend on it, a wrong one costs speed or memory.
    """
    if isinstance(src, torch.nn.Parameter):
        return "param"
    return "buffer" if getattr(_moving_module, "active", False) else "batch"


def install_upload_hints():
    """Wrap ``Module._apply`` so that uploads made by it are told apart from batches, and that a
    move keeps the module's parameter objects, shared ones shared (offload/parameter_swap.py)."""
    original = torch.nn.Module._apply
    if getattr(original, "_moai_marks_uploads", False):
        return

    @functools.wraps(original)
    def _apply(self, *args, **kwargs):
        outer = getattr(_moving_module, "active", False)   # _apply recurses into children
        _moving_module.active = True
        try:
            if outer:
                return original(self, *args, **kwargs)
            places = [(m, name, p) for m in self.modules() for name, p in m._parameters.items()
                      if p is not None]
            try:
                result = original(self, *args, **kwargs)
            except AssertionError as e:
                torchscript.refuse_moving(self, e)
                raise
            parameter_swap.keep_identities(places)
            return result
        finally:
            _moving_module.active = outer

    _apply._moai_marks_uploads = True
    torch.nn.Module._apply = _apply


_SNAPSHOT_BYTES = 64 << 20


def upload(dst: RemoteTensor, src: torch.Tensor, non_blocking: bool):
    session = sessions.current()
    shard = upload_hint(src)
    src = src.detach()
    data = src.contiguous()
    if non_blocking and data.data_ptr() == src.data_ptr():
        # The message would read the program's memory when it leaves. Pinning is a no-op here, so
        # this is a copy from pageable memory, which CUDA has read before it returns: the program
        # may refill the buffer at once (a reused batch buffer, a NumPy array an environment
        # writes). So the bytes are taken now: copied, or for a large tensor (a model's weight,
        # whose copy would double the host memory it takes) sent before returning.
        if data.nbytes <= _SNAPSHOT_BYTES:
            data = data.clone()
        else:
            non_blocking = False
    exact = src.shape == dst.shape and src.dtype == dst.dtype and dst._meta.is_contiguous()
    if exact and session.drop_fresh_allocation(dst._handle.id):
        # ``.to(device)`` is empty + copy_: the tensor can simply arrive as the allocation. A
        # non-contiguous source (``window[:, :-1]``) is made contiguous here rather than copied
        # on the device: a copy into a device allocation would take the allocation's placement
        # (replicated) and lose the hint.
        session.put(dst._handle.id, data, wait_sent=not non_blocking, shard=shard)
        return
    staging = session.new_id()
    session.put(staging, data, wait_sent=not non_blocking, shard=shard)
    session.enqueue("aten::copy_", [RemoteRef(dst._handle.id), RemoteRef(staging)], {}, dst._handle.id)
    session.release_id(staging)


_DETACH = aten.detach.default


@DISPATCHER.rule(_DETACH, aten.alias.default)
def alias(func, args, kwargs):
    """The same remote tensor under a second wrapper: no op travels (autograd saves its tensors
    through detach, tens a step). A parameter's alias names the plain tensor, no leaf of any
    graph; the detached one of a tensor with a graph names it detached, since the worker's tensor
    may carry the worker's graph (offload/remote_backward.py)."""
    src = args[0]
    handle = src._handle
    if type(handle) is LeafHandle:
        handle = handle.plain
    elif func is _DETACH and src.requires_grad and not src.is_leaf:
        handle = DetachedHandle(handle)
    return RemoteTensor(func(src._meta), handle)


@DISPATCHER.rule(aten.detach_.default)
def detach_(func, args, kwargs):
    """Here only with autograd's keys excluded (``inference_mode``: ``torch.tensor(data,
    device=...)`` detaches its result): autograd's metadata alone changes, the worker's tensor
    stays as it is (``RemoteTensor.detach_`` names one with a graph detached)."""
    return args[0]


@DISPATCHER.rule(aten._local_scalar_dense.default)
def local_scalar_dense(func, args, kwargs):
    sync_debug.check()
    return sessions.current().item(args[0]._handle.id)


@DISPATCHER.rule(aten.repeat_interleave.Tensor)
def repeat_interleave(func, args, kwargs):
    """The result's length is the repeats' sum: without ``output_size`` the meta kernel cannot
    know it, so the op runs at once and its shape is asked back (CUDA syncs for it too)."""
    if kwargs.get("output_size") is not None:
        return DISPATCHER.run(func, args, kwargs)
    return DISPATCHER.run_data_dependent(func, wire_form(list(args), []), wire_form(kwargs, []))


# Ops the workers cannot run as such (the CUDA-only fused RNN cells torch emits for any non-CPU
# input; torch.equal / allclose, whose result is a Python bool), as ordinary device ops.
from offload import decompositions  # noqa: E402,F401  (registers its rules on DISPATCHER)
