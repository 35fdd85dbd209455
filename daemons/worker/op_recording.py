"""Record a plain PyTorch program's aten op stream as worker op records, without a front.

The front turns every op the user's program runs on ``cuda:0`` into an op record
``[seq, op, args, kwargs, out]`` whose tensors are ``RemoteRef`` handles (docs/PROTOCOL.md). This
module produces the same stream from a program run on plain CPU tensors, under a
``TorchDispatchMode`` (below autograd, so forward, backward and optimizer ops all appear, exactly
as the front sees them). The run itself is the native reference: tests compare the workers'
results with the values it computed. The scaling bench uses it to feed workers a real training
step.

A recording is a list of steps, each one message the front would send: ``("put", id, tensor,
shard)`` for a tensor entering the device (``shard`` is the ``put`` hint: ``"param"``,
``"batch"``, ... or None), ``("ops", [records])``, ``("free", [ids])`` when a tensor dies and
``("fetch", id, value)`` where the program reads a value back (``.item()``; ``value`` is what it
read natively). Tensors the program made outside the recording and then used (constants, Adam's
step counters) are put on first use with no hint. ``manual_seed`` seeds both the native run and
the recorded stream, so random ops draw the same numbers on both sides.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from daemons.wire import RemoteRef

# The executor's seed pseudo-op (docs/PROTOCOL.md). Not imported from executor.py: importing it
# renames PrivateUse1 to the front's device, after which torch.optim's accelerator check fails
# in this process, which runs the program natively.
SEED_OP = "moai::manual_seed"

# ``.item()`` / ``.tolist()``: the front answers these with a fetch, never as a streamed op.
FETCH_OPS = {torch.ops.aten._local_scalar_dense.default}


class OpRecorder(TorchDispatchMode):
    """Runs ops natively and appends one op record per op; ``put`` registers device inputs."""

    def __init__(self):
        super().__init__()
        self.steps: list = []
        self._ids: dict[int, int] = {}        # id(python tensor) -> handle id
        self._next_id = itertools.count(1)
        self._seq = itertools.count(1)

    def put(self, tensor: torch.Tensor, kind: str | None = None) -> int:
        tid = next(self._next_id)
        self._track(tensor, tid)
        with _disable_current_modes():   # the copy is not an op of the program
            copy = tensor.detach().clone()
        self.steps.append(("put", tid, copy, kind))
        return tid

    def manual_seed(self, seed: int):
        torch.manual_seed(seed)
        self._append([next(self._seq), SEED_OP, [seed], {}, None])

    def _track(self, tensor: torch.Tensor, tid: int):
        # The front frees a handle when its tensor dies; so does the recording. Forgetting the
        # id() at death also keeps a recycled id() from naming the wrong tensor.
        self._ids[id(tensor)] = tid
        weakref.finalize(tensor, self._free, id(tensor), tid)

    def _free(self, key: int, tid: int):
        if self._ids.get(key) == tid:
            del self._ids[key]
        self.steps.append(("free", [tid]))

    def handle(self, tensor: torch.Tensor) -> int:
        """The handle id of a tensor the recording has seen (e.g. a loss to fetch)."""
        return self._ids[id(tensor)]

    def _ref(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in self._ids:
            self.put(x)
        return RemoteRef(self._ids[id(x)])

    def _out_ids(self, out, inputs: list):
        def assign(x):
            if not isinstance(x, torch.Tensor):
                return None
            aliased = next((t for t in inputs if t is x), None)
            if aliased is not None:
                return self._ids[id(aliased)]
            tid = next(self._next_id)
            self._track(x, tid)
            return tid
        return tree_map(assign, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FETCH_OPS:
            value = func(*args, **kwargs)
            self.steps.append(("fetch", self._ref(args[0]).id, value))
            return value
        if func.namespace != "aten":   # profiler marks are no device ops
            return func(*args, **kwargs)
        ref_args, ref_kwargs = tree_map(self._ref, (list(args), kwargs))
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self._append([next(self._seq), func.name(), ref_args, ref_kwargs, self._out_ids(out, inputs)])
        return out

    def _append(self, record: list):
        if self.steps and self.steps[-1][0] == "ops":
            self.steps[-1][1].append(record)
        else:
            self.steps.append(("ops", [record]))


def record_mlp_training(*, batch: int, features: int = 16, hidden: int = 32, classes: int = 4,
                        steps: int = 3, seed: int = 0):
    """The reference workload of tests/parallel and the scaling bench, recorded.

    An MLP with dropout trained with Adam on one batch, as a user would write it for one device;
    the loss is read with ``.item()`` every step. Returns the recorder and the natively trained
    model (its parameters' handles are ``recorder.handle(p)``).
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(hidden, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(batch, features), torch.randint(0, classes, (batch,))
    recorder = OpRecorder()
    with recorder:
        for p in model.parameters():
            recorder.put(p, "param")
        recorder.put(x, "batch")
        recorder.put(y, "batch")
        recorder.manual_seed(seed + 1)   # dropout draws from the device's generator
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss.item()
    return recorder, model
