"""The worker's op executor: a tensor table, the op stream runner and the memory cap.

The front streams op records ``[seq, op, args, kwargs, out]`` (docs/PROTOCOL.md, Worker). Each
record names an aten/prims overload; its tensor arguments are ``RemoteRef`` handles into this
worker's table and ``out`` says which fresh ids the results take. Streamed messages get no reply:
the first failure is held, later records of the stream are skipped (their inputs may be missing)
and the next ``sync`` or ``fetch`` reports it, naming the op, like an asynchronous CUDA error.

Memory: on a CPU worker the cap is enforced here by counting the bytes of the live, unique
storages of the table after every op (allocations are refused before they happen, so a huge
``torch.empty`` never reaches the host's allocator); on a GPU the CUDA caching allocator enforces
it (``set_per_process_memory_fraction``) and its real out-of-memory error is reported.

Where SPMD plugs in (daemons/worker/spmd.py, owned with automatic parallelism): for
``world_size > 1`` main.py builds ``SpmdExecutor``, a subclass keeping this table, these handlers
and the held-error rules, and overriding only what touches tensor placement: ``put``, ``_op``
(the callable an op name resolves to), ``fetch``, ``memory_stats``, ``set_memory_fraction``, the
memory meter and ``_host_state`` (an uploaded generator state as the generator takes it). Keep
those seams stable. With ``world_size == 1`` nothing of spmd is imported and ops run locally.

The backward on the worker (``moai::backward``, offload/remote_backward.py): the front names the
parameters its forward ops read as ``LeafRef``s. Such an argument resolves, while the stream's
grad mode (``moai::grad_mode``) is on, to a leaf sharing the tensor's storage and requiring grad,
so the forward builds an autograd graph here as it would natively; the table keeps the plain
tensor, which ops without grad mode and the ops writing into a parameter get. ``moai::backward``
then runs torch's autograd on that graph: one record instead of a backward traced op by op on the
front. Autograd calls the gradient ops itself, past ``_op``: ``_autograd_ops`` is the seam where a
multi-worker job gives them its placement rules. What the program detached names its tensor as a
``DetachedRef``, which resolves to the tensor detached from that graph.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from daemons import wire
from daemons.worker import (accumulating_matmul, conv_layout, fused_attention, fused_linear, host_memory,
                            torch_settings)
from daemons.worker.pseudo_ops import (BACKWARD_OP, GENERATOR_OP, GET_RNG_STATE_OP, GRAD_MODE_OP,
                                       SEED_OP, SET_RNG_STATE_OP)
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.worker.executor")

# Only operator libraries made of plain tensor math may be named by a front; anything else
# (custom C++ ops, torch.ops.profiler ...) is refused rather than looked up.
ALLOWED_NAMESPACES = ("aten", "prims")
# Op arguments that are their own value on the worker.
_PLAIN_ARGUMENTS = frozenset({int, float, bool, str, type(None), torch.dtype})
# The worker's implementations of the ops no device has a kernel for, by the name a record uses.
_KERNELS = {**fused_attention.KERNELS, **fused_linear.KERNELS, **conv_layout.KERNELS,
            **accumulating_matmul.KERNELS}
# Allocations whose size is known from their arguments: checked against the cap before they run.
_EMPTY_OPS = ("aten::empty.memory_format", "aten::empty_strided")


class OpError(Exception):
    """A held stream failure: ``code`` is ``oom``, ``op_failed``, ``missing_tensor`` or
    ``device_lost`` (an exception with a ``wire_code`` of its own: a multi-worker job's broken
    group)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @classmethod
    def of(cls, e: Exception, what: str) -> "OpError":
        """The held error of ``what`` (``"aten::mm (op #7)"``), which raised ``e``."""
        if isinstance(e, torch.OutOfMemoryError) or _host_allocation_failed(e):
            return cls("oom", f"{what} ran out of device memory: {e}")
        return cls(getattr(e, "wire_code", "op_failed"), f"{what} failed: {type(e).__name__}: {e}")


def runnable(name: str) -> bool:
    """Whether a front may name this op in a record: an op of torch's plain tensor math, or one
    the worker implements itself."""
    return name in _KERNELS or name.partition("::")[0] in ALLOWED_NAMESPACES


def resolve_op(name: str):
    """``"aten::add.Tensor"`` -> ``torch.ops.aten.add.Tensor``, looked up by attribute, never eval'd.

    An op no device has a kernel for (the virtual device's fused attention and linear) resolves
    to the worker's own implementation of it."""
    kernel = _KERNELS.get(name)
    if kernel is not None:
        return kernel
    if not runnable(name):
        raise OpError("op_failed", f"op {name!r} is not an aten/prims operator")
    namespace, _, rest = name.partition("::")
    packet_name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), packet_name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise OpError("op_failed", f"unknown operator {name!r}") from None


class MemoryMeter:
    """Bytes of the unique storages held by the table (views share their base's storage)."""

    def __init__(self):
        self._storages: dict[int, list] = {}   # data_ptr -> [nbytes, tensors referencing it]
        self.allocated = 0
        self.peak = 0

    def add(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            self._storages[key] = [nbytes, 1]
            self.allocated += nbytes
            if self.allocated > self.peak:
                self.peak = self.allocated
        else:
            entry[1] += 1

    def storages(self) -> list[tuple[int, list]]:
        """(address, [nbytes, tensors referencing it]) of each storage counted."""
        return list(self._storages.items())

    def remove(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._storages[key]
            self.allocated -= entry[0]


class Executor:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        self.on_gpu = self.device.type == "cuda"
        self.memory_cap = spec.memory_cap   # lowered by a program's set_per_process_memory_fraction
        if self.on_gpu:
            torch.cuda.set_device(self.device)
            self._cap_gpu()
        else:
            torch.set_num_threads(max(1, spec.threads))
            host_memory.keep_freed_memory()
        self.device_name = str(self.device)
        self.tensors: dict[int, torch.Tensor] = {}
        # id -> the leaf standing for that table tensor in this worker's autograd graphs
        self.leaves: dict[int, torch.Tensor] = {}
        # id -> that table tensor detached from this worker's graphs (a front's DetachedRef)
        self.detached: dict[int, torch.Tensor] = {}
        # id -> a generator of the program's (torch.Generator(device="cuda")), beside the tensors
        self.generators: dict[int, torch.Generator] = {}
        self._leaf_argument = False   # set when the record being resolved named a LeafRef
        self.meter = MemoryMeter()
        self.error: OpError | None = None
        self.done_seq = 0
        self._ops: dict[str, object] = {}

    def handlers(self) -> dict:
        """The data-plane requests (docs/PROTOCOL.md, Worker); streamed ones answer NO_REPLY."""
        return {
            "run_ops": self._streamed(self.run_ops),
            "put": self._streamed(self.put),
            "fetch": self.fetch,
            "item": self.item,
            "describe": self.describe,
            "free": self._streamed(self.free),
            "sync": self.sync,
            "memory_stats": self.memory_stats,
            "memory_snapshot": self.memory_snapshot,
            "reset_peak": self.reset_peak,
            "set_memory_fraction": self.set_memory_fraction,
        }

    def _streamed(self, handler):
        """Nobody waits for a streamed message's reply: a malformed one is held like a failed op,
        for the next ``sync`` or ``fetch`` to report."""
        def run(msg):
            try:
                return handler(msg)
            except wire.RequestError as e:
                self._hold(OpError("op_failed", f"bad {msg.type} message: {e.message}"))
                return wire.NO_REPLY
        return run

    def _hold(self, error: OpError):
        if self.error is None:
            self.error = error
            log.warning("held error: %s", error)

    def close(self):
        self.tensors.clear()
        self.leaves.clear()
        self.detached.clear()
        self.generators.clear()

    # --- table --------------------------------------------------------------------------------

    def _store(self, tid: int, t: torch.Tensor):
        old = self.tensors.get(tid)
        if old is t:
            return
        if self.leaves or self.detached:
            for aliases in (self.leaves, self.detached):
                alias = aliases.get(tid)
                if alias is t:
                    return  # an op handed back a leaf or detached alias: the table keeps the tensor
                if alias is not None:
                    del aliases[tid]  # the id names another tensor now: its alias is stale
        if old is not None:
            self.meter.remove(old)
        self.tensors[tid] = t
        if not self.on_gpu:
            self.meter.add(t)

    def _drop(self, tid: int):
        if self.leaves or self.detached:
            self.leaves.pop(tid, None)
            self.detached.pop(tid, None)
        if self.generators:
            self.generators.pop(tid, None)
        t = self.tensors.pop(tid, None)
        if t is not None and not self.on_gpu:
            self.meter.remove(t)

    def _resolve(self, x):
        kind = type(x)  # exact types, most frequent first: this runs for every argument of every op
        if kind is wire.RemoteRef:
            t = self.tensors.get(x.id)
            if t is None:
                raise OpError("missing_tensor", f"tensor #{x.id} does not exist on this worker "
                                                "(never created, already freed, or its op failed)")
            return t
        if kind in _PLAIN_ARGUMENTS:
            return x
        if kind is list:
            return [self._resolve(v) for v in x]
        if kind is tuple:
            return tuple(self._resolve(v) for v in x)
        if kind is dict:
            return {k: self._resolve(v) for k, v in x.items()}
        if kind is torch.device:
            return self.device
        if kind is wire.LeafRef:
            self._leaf_argument = True
            return self._leaf(x.id) if torch.is_grad_enabled() else self._plain(x.id)
        if kind is wire.DetachedRef:
            t = self.detached.get(x.id)
            if t is None:
                t = self.detached[x.id] = self._plain(x.id).detach()
            return t
        if kind is wire.GeneratorRef:
            generator = self.generators.get(x.id)
            if generator is None:
                raise OpError("missing_tensor", f"generator #{x.id} does not exist on this worker")
            return generator
        if isinstance(x, torch.Tensor) and x.dim() > 0:  # a CPU 0-dim scalar stays where it is
            return x.to(self.device)
        return x

    def _resolve_args(self, args):
        """``_resolve`` of a record's argument list, its frequent entries handled inline."""
        if type(args) is not list:
            return self._resolve(args)
        tensors = self.tensors
        resolved = []
        for x in args:
            kind = type(x)
            if kind is wire.RemoteRef:
                t = tensors.get(x.id)
                resolved.append(self._resolve(x) if t is None else t)  # _resolve names the missing id
            elif kind in _PLAIN_ARGUMENTS:
                resolved.append(x)
            else:
                resolved.append(self._resolve(x))
        return resolved

    def _bind_outputs(self, spec, result):
        if spec is None:
            return
        if isinstance(spec, int):
            if not isinstance(result, torch.Tensor):
                raise OpError("op_failed", f"expected a tensor result, got {type(result).__name__}")
            self._store(spec, result)
            return
        for s, r in zip(spec, result):
            self._bind_outputs(s, r)

    # --- the stream ---------------------------------------------------------------------------

    def _op(self, name: str):
        op = self._ops.get(name)
        if op is None:
            op = self._ops[name] = resolve_op(name)
        return op

    def _run_one(self, record):
        seq, name, args, kwargs, out = record
        pseudo = self._pseudo_ops.get(name)
        if pseudo is not None:
            pseudo(self, seq, args, out)
            return
        op = self._op(name)
        args = self._resolve_args(args)
        kwargs = self._resolve(kwargs) if kwargs else {}
        if self._leaf_argument:
            self._leaf_argument = False
            if torch.is_grad_enabled() and op._schema.is_mutable:
                args, kwargs = self._written_plain(op, args, kwargs)
        if name in _EMPTY_OPS and not self.on_gpu:
            self._check_cap(name, seq, _allocation_bytes(name, args, kwargs))
        try:
            result = op(*args, **kwargs)
        except Exception as e:
            raise OpError.of(e, f"{name} (op #{seq})") from None
        before = self.meter.allocated
        if type(out) is int and isinstance(result, torch.Tensor):  # most ops: one fresh tensor
            self._store(out, result)
        else:
            self._bind_outputs(out, result)
        if not self.on_gpu and self.meter.allocated > self.memory_cap:
            grown = self.meter.allocated - before
            self._bind_release(out)
            self._check_cap(name, seq, grown)

    # --- pseudo-ops: stream records that are not aten ops -----------------------------------------

    def _generator(self, refs: list) -> torch.Generator:
        """The generator an RNG record names after its own arguments, else the device's default."""
        if refs:
            generator = self._resolve(refs[0])
            if not isinstance(generator, torch.Generator):
                raise OpError("op_failed", f"{refs[0]!r} is not a generator")
            return generator
        if self.on_gpu:
            torch.cuda.init()   # fills default_generators
            return torch.cuda.default_generators[torch.cuda.current_device()]
        return torch.default_generator

    def _new_generator(self, seq, args, out):
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(args[0]))
        self.generators[out] = generator

    def _manual_seed(self, seq, args, out):
        if len(args) > 1:
            self._generator(args[1:]).manual_seed(int(args[0]))
        else:
            torch.manual_seed(int(args[0]))   # every default generator, as torch.manual_seed does

    def _get_rng_state(self, seq, args, out):
        self._store(out, self._generator(args).get_state())

    def _set_rng_state(self, seq, args, out):
        self._generator(args[1:]).set_state(self._host_state(self._resolve(args[0])))

    def _host_state(self, state: torch.Tensor) -> torch.Tensor:
        """An uploaded generator state as ``Generator.set_state`` takes it: a CPU byte tensor."""
        return state.cpu()

    def _setting(self, seq, args, out):
        try:
            done = torch_settings.apply(*args)
        except Exception as e:
            raise OpError.of(e, f"setting (op #{seq})") from None
        log.info("the program set %s", done)

    def _grad_mode(self, seq, args, out):
        torch.set_grad_enabled(bool(args[0]))

    def _backward(self, seq, args, out):
        """``loss.backward()`` on this worker's graph, for the parameters the front named; their
        gradients are stored under ``out``'s ids (an accumulated one: the id of the gradient it
        is added to, in place, as torch's AccumulateGrad does)."""
        loss_ref, leaf_refs, grad_refs = args
        loss = self._resolve(loss_ref)
        if loss.grad_fn is None:
            raise OpError("op_failed", f"backward (op #{seq}): tensor #{loss_ref.id} has no autograd "
                                       "graph on this worker")
        leaves = [self._leaf(ref.id) for ref in leaf_refs]
        for leaf in leaves:
            leaf.grad = None
        try:
            with self._autograd_ops():
                torch.autograd.backward(loss, inputs=leaves)
        except Exception as e:
            raise OpError.of(e, f"backward (op #{seq})") from None
        for leaf, grad_ref, tid in zip(leaves, grad_refs, out):
            grad, leaf.grad = leaf.grad, None
            if grad is None or grad._is_zerotensor():
                # Only undefined gradients reached it (torch then leaves ``.grad`` as it was):
                # the front has handed out a gradient already, so it is zeros. Or a gradient of
                # zeros that holds no memory (sgn's), which the table cannot hold.
                grad = torch.zeros_like(leaf)
            if grad_ref is not None:
                self._resolve(grad_ref).add_(grad)
            else:
                if grad.stride() != leaf.stride():
                    grad = torch.empty_like(leaf).copy_(grad)  # the layout the front gave it
                self._store(tid, grad)
        if not self.on_gpu and self.meter.allocated > self.memory_cap:
            self._check_cap("backward", seq, 0)

    _pseudo_ops = {GENERATOR_OP: _new_generator, SEED_OP: _manual_seed, GET_RNG_STATE_OP: _get_rng_state,
                   SET_RNG_STATE_OP: _set_rng_state, GRAD_MODE_OP: _grad_mode, BACKWARD_OP: _backward,
                   torch_settings.SETTING_OP: _setting}

    def _autograd_ops(self):
        """The context of a backward's gradient ops, which autograd calls itself, past ``_op``."""
        return contextlib.nullcontext()

    def _plain(self, tid: int) -> torch.Tensor:
        t = self.tensors.get(tid)
        return t if t is not None else self._resolve(wire.RemoteRef(tid))  # which names the missing id

    def _leaf(self, tid: int) -> torch.Tensor:
        leaf = self.leaves.get(tid)
        if leaf is None:
            plain = self._plain(tid)
            if not (plain.is_floating_point() or plain.is_complex()):
                raise OpError("op_failed", f"tensor #{tid} ({plain.dtype}) cannot require gradients")
            # detach shares the version counter: an in-place change of the parameter between
            # forward and backward is caught as torch catches it.
            leaf = self.leaves[tid] = plain.detach().requires_grad_()
        return leaf

    def _written_plain(self, op, args, kwargs):
        """The arguments an op writes into, as plain tensors where they are parameters' leaves:
        the front's autograd allowed the write (through ``.data``, or on a frozen parameter),
        which the leaf's own would refuse."""
        written = _written_arguments(op)
        ids = {id(leaf): tid for tid, leaf in self.leaves.items()}

        def plain(t):
            if isinstance(t, list):
                return [plain(v) for v in t]
            tid = ids.get(id(t))
            return t if tid is None else self.tensors[tid]

        args = [plain(a) if i in written else a for i, a in enumerate(args)]
        kwargs = {k: plain(v) if k in written else v for k, v in kwargs.items()}
        return args, kwargs

    def _check_cap(self, name: str, seq: int, extra: int):
        if self.meter.allocated + extra > self.memory_cap:
            raise OpError("oom", f"{name} (op #{seq}) ran out of device memory: tried to allocate "
                                 f"{extra} bytes with {self.meter.allocated} bytes in use and a "
                                 f"cap of {self.memory_cap} bytes")

    def _bind_release(self, spec):
        """Undo the outputs of an op that broke the cap, so the memory really comes back."""
        if isinstance(spec, int):
            self._drop(spec)
        elif spec is not None:
            for s in spec:
                self._bind_release(s)

    def run_ops(self, msg):
        records = wire.field(msg.body, "ops", list)
        freed = wire.field(msg.body, "free", list, ())
        for record in records:
            if self.error is None:
                try:
                    self._run_one(record)
                except OpError as e:
                    self._hold(e)
                except Exception as e:  # a malformed record: streamed, so held like any failure
                    self._hold(OpError("op_failed", f"bad op record {str(record)[:200]}: "
                                                    f"{type(e).__name__}: {e}"))
            if isinstance(record, list) and record and isinstance(record[0], int):
                self.done_seq = record[0]
        self._free_ids(freed)
        return wire.NO_REPLY

    def _raise_held(self):
        if self.error is not None:
            err, self.error = self.error, None
            raise wire.RequestError(err.code, str(err))

    # --- requests -------------------------------------------------------------------------------

    def put(self, msg):
        t, tid = wire.field(msg.body, "tensor", torch.Tensor), wire.field(msg.body, "id", int)
        if not self.on_gpu and self.meter.allocated + t.nbytes > self.memory_cap:
            # The upload's bytes are dropped: nothing is held past the cap.
            self._hold(OpError("oom", f"upload of tensor #{tid} ran out of device memory: "
                                      f"{t.nbytes} bytes with {self.meter.allocated} bytes in "
                                      f"use and a cap of {self.memory_cap} bytes"))
            return wire.NO_REPLY
        self._store(tid, t if not self.on_gpu else t.to(self.device, non_blocking=True))
        return wire.NO_REPLY

    def fetch(self, msg):
        self._raise_held()
        tid = wire.field(msg.body, "id", int)
        t = self.tensors.get(tid)
        if t is None:
            raise wire.RequestError("missing_tensor", f"tensor #{tid} does not exist "
                                                      "(its op failed or it was freed)")
        return {"tensor": t}

    def item(self, msg):
        """``.item()``: the number alone. A tensor reply costs a round of torch calls on each side
        (encoding, then decoding on caches gone cold during the wait): about 35 of the 230 us a
        ``.item()`` took on loopback this way (docs/PERFORMANCE.md)."""
        t = self.fetch(msg)["tensor"]   # rank 0's whole tensor in a multi-worker job, else None
        return {"value": None if t is None else t.item()}

    def describe(self, msg):
        """Shapes of results the front could not infer (data-dependent ops such as nonzero)."""
        self._raise_held()
        out = []
        for tid in wire.field(msg.body, "ids", list):
            t = self.tensors.get(tid) if isinstance(tid, int) else None
            if t is None:
                raise wire.RequestError("missing_tensor", f"tensor #{tid} does not exist")
            out.append([list(t.shape), list(t.stride()), t.storage_offset(), t.dtype])
        return {"tensors": out}

    def free(self, msg):
        self._free_ids(wire.field(msg.body, "ids", list))
        return wire.NO_REPLY

    def _free_ids(self, ids: list):
        for tid in ids:
            if isinstance(tid, int):
                self._drop(tid)

    def _memory(self) -> dict:
        if self.on_gpu:
            return {"allocated": torch.cuda.memory_allocated(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device), "cap": self.memory_cap}
        return {"allocated": self.meter.allocated, "peak": self.meter.peak, "cap": self.memory_cap}

    def sync(self, msg):
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        self._raise_held()
        return {"done_seq": self.done_seq, **self._memory()}

    def memory_stats(self, msg):
        return self._memory()

    def memory_snapshot(self, msg):
        """The live allocations in the layout of CUDA's snapshots (``torch.cuda.memory._snapshot``'s
        segments): a GPU's allocator's own; on a CPU, each storage of the table a segment of one
        block."""
        if self.on_gpu:
            return {"segments": torch.cuda.memory._snapshot()["segments"]}
        return {"segments": [
            {"device": 0, "address": address, "total_size": nbytes, "allocated_size": nbytes,
             "active_size": nbytes, "requested_size": nbytes, "stream": 0, "segment_type": "large",
             "segment_pool_id": (0, 0), "is_expandable": False, "frames": [],
             "blocks": [{"address": address, "size": nbytes, "requested_size": nbytes,
                         "state": "active_allocated", "frames": []}]}
            for address, (nbytes, _) in self.meter.storages()]}

    def set_memory_fraction(self, msg):
        """``torch.cuda.set_per_process_memory_fraction``: the cap becomes this fraction of the
        job's (the device's memory as the program sees it); past it ops fail with an OOM error."""
        fraction = wire.field(msg.body, "fraction", float)
        if not 0.0 <= fraction <= 1.0:
            raise wire.RequestError("bad_request", f"fraction {fraction} is not within 0~1")
        self.memory_cap = int(self.spec.memory_cap * fraction)
        if self.on_gpu:
            self._cap_gpu()
        return {"cap": self.memory_cap}

    def _cap_gpu(self):
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.memory_cap / total), self.device)

    def reset_peak(self, msg):
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter.peak = self.meter.allocated
        return {}


def _written_arguments(op) -> frozenset:
    """Positions and names of the arguments ``op`` writes into."""
    args = op._schema.arguments
    return frozenset([i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
                     + [a.name for a in args if a.alias_info is not None and a.alias_info.is_write])


def _allocation_bytes(name: str, args: list, kwargs: dict) -> int:
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    size = [int(s) for s in args[0]]
    if name == "aten::empty_strided":
        span = 0 if 0 in size else 1 + sum((s - 1) * int(st) for s, st in zip(size, args[1]))
    else:
        span = 1
        for s in size:
            span *= s
    return span * torch.empty((), dtype=dtype).element_size()


def _host_allocation_failed(e: Exception) -> bool:
    """The CPU allocator's refusal (an op's temporaries past the host's memory) is an OOM too."""
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
