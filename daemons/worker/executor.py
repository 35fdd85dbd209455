"""The worker's op executor: a tensor table, the op stream runner and the memory cap.

The front streams op records ``[seq, op, args, kwargs, out]`` (docs/PROTOCOL.md, Worker). Each
record names an aten/prims overload; its tensor arguments are ``RemoteRef`` handles into this
worker's table and ``out`` says which fresh ids the results take. Streamed messages get no reply:
the first failure is held, later records of the stream are skipped (their inputs may be missing)
and the next ``sync`` or ``fetch`` reports it, naming the op, like an asynchronous CUDA error.

Memory: on a CPU worker the cap is enforced here by counting the bytes of the live, unique
storages of the table after every op; on a GPU the CUDA caching allocator enforces it
(``set_per_process_memory_fraction``) and its real out-of-memory error is reported.
"""
from __future__ import annotations

import logging

import torch

from daemons import wire
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.worker.executor")

# Only operator libraries made of plain tensor math may be named by a front; anything else
# (custom C++ ops, torch.ops.profiler ...) is refused rather than looked up.
ALLOWED_NAMESPACES = ("aten", "prims")
# Pseudo-ops the front sends inside the stream, so they keep their order relative to real ops.
SEED_OP = "moai::manual_seed"


class OpError(Exception):
    """A held stream failure: ``code`` is ``oom``, ``op_failed`` or ``missing_tensor``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def resolve_op(name: str):
    """``"aten::add.Tensor"`` -> ``torch.ops.aten.add.Tensor``, looked up by attribute, never eval'd."""
    namespace, sep, rest = name.partition("::")
    if not sep or namespace not in ALLOWED_NAMESPACES:
        raise OpError("op_failed", f"op {name!r} is not an aten/prims operator")
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
            self._storages[key] = [storage.nbytes(), 1]
            self.allocated += storage.nbytes()
            self.peak = max(self.peak, self.allocated)
        else:
            entry[1] += 1

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
        if self.on_gpu:
            torch.cuda.set_device(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_cap / total), self.device)
        else:
            torch.set_num_threads(max(1, spec.threads))
        self.device_name = str(self.device)
        self.tensors: dict[int, torch.Tensor] = {}
        self.meter = MemoryMeter()
        self.error: OpError | None = None
        self.done_seq = 0
        self._ops: dict[str, object] = {}

    def handlers(self) -> dict:
        """The data-plane requests (docs/PROTOCOL.md, Worker); streamed ones answer NO_REPLY."""
        return {
            "run_ops": self.run_ops,
            "put": self.put,
            "fetch": self.fetch,
            "describe": self.describe,
            "free": self.free,
            "sync": self.sync,
            "memory_stats": self.memory_stats,
            "reset_peak": self.reset_peak,
        }

    def close(self):
        self.tensors.clear()

    # --- table --------------------------------------------------------------------------------

    def _store(self, tid: int, t: torch.Tensor):
        old = self.tensors.get(tid)
        if old is t:
            return
        if old is not None:
            self.meter.remove(old)
        self.tensors[tid] = t
        if not self.on_gpu:
            self.meter.add(t)

    def _drop(self, tid: int):
        t = self.tensors.pop(tid, None)
        if t is not None and not self.on_gpu:
            self.meter.remove(t)

    def _resolve(self, x):
        if isinstance(x, wire.RemoteRef):
            t = self.tensors.get(x.id)
            if t is None:
                raise OpError("missing_tensor", f"tensor #{x.id} does not exist on this worker "
                                                "(never created, already freed, or its op failed)")
            return t
        if isinstance(x, list):
            return [self._resolve(v) for v in x]
        if isinstance(x, tuple):
            return tuple(self._resolve(v) for v in x)
        if isinstance(x, dict):
            return {k: self._resolve(v) for k, v in x.items()}
        if isinstance(x, torch.device):
            return self.device
        if isinstance(x, torch.Tensor) and x.dim() > 0:  # a CPU 0-dim scalar stays where it is
            return x.to(self.device)
        return x

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
        if name == SEED_OP:
            torch.manual_seed(int(args[0]))
            return
        op = self._op(name)
        try:
            result = op(*self._resolve(args), **self._resolve(kwargs or {}))
        except OpError:
            raise
        except torch.OutOfMemoryError as e:
            raise OpError("oom", f"{name} (op #{seq}) ran out of device memory: {e}") from None
        except Exception as e:
            raise OpError("op_failed", f"{name} (op #{seq}) failed: {type(e).__name__}: {e}") from None
        self._bind_outputs(out, result)
        if not self.on_gpu and self.meter.allocated > self.spec.memory_cap:
            self._bind_release(out)
            raise OpError("oom", f"{name} (op #{seq}) ran out of device memory: "
                                 f"{self.meter.allocated} bytes in use past the cap of "
                                 f"{self.spec.memory_cap} bytes")

    def _bind_release(self, spec):
        """Undo the outputs of an op that broke the cap, so the memory really comes back."""
        if isinstance(spec, int):
            self._drop(spec)
        elif spec is not None:
            for s in spec:
                self._bind_release(s)

    def run_ops(self, msg):
        for record in msg.body["ops"]:
            if self.error is None:
                try:
                    self._run_one(record)
                except OpError as e:
                    self.error = e
                    log.info("held error: %s", e)
            self.done_seq = record[0]
        return wire.NO_REPLY

    def _raise_held(self):
        if self.error is not None:
            err, self.error = self.error, None
            raise wire.RequestError(err.code, str(err))

    # --- requests -------------------------------------------------------------------------------

    def put(self, msg):
        t = msg.body["tensor"]
        self._store(int(msg.body["id"]), t if not self.on_gpu else t.to(self.device, non_blocking=True))
        return wire.NO_REPLY

    def fetch(self, msg):
        self._raise_held()
        t = self.tensors.get(int(msg.body["id"]))
        if t is None:
            raise wire.RequestError("missing_tensor", f"tensor #{msg.body['id']} does not exist "
                                                      "(its op failed or it was freed)")
        return {"tensor": t}

    def describe(self, msg):
        """Shapes of results the front could not infer (data-dependent ops such as nonzero)."""
        self._raise_held()
        out = []
        for tid in msg.body["ids"]:
            t = self.tensors.get(int(tid))
            if t is None:
                raise wire.RequestError("missing_tensor", f"tensor #{tid} does not exist")
            out.append([list(t.shape), list(t.stride()), t.storage_offset(), t.dtype])
        return {"tensors": out}

    def free(self, msg):
        for tid in msg.body["ids"]:
            self._drop(int(tid))
        return wire.NO_REPLY

    def _memory(self) -> dict:
        if self.on_gpu:
            return {"allocated": torch.cuda.memory_allocated(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device), "cap": self.spec.memory_cap}
        return {"allocated": self.meter.allocated, "peak": self.meter.peak, "cap": self.spec.memory_cap}

    def sync(self, msg):
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        self._raise_held()
        return {"done_seq": self.done_seq, **self._memory()}

    def memory_stats(self, msg):
        return self._memory()

    def reset_peak(self, msg):
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter.peak = self.meter.allocated
        return {}
