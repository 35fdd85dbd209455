"""``loss.backward()`` as one record: the worker runs the backward on its own autograd graph.

Traced on the front, a backward is an op record per gradient op, each a Python dispatch here and
a record the worker interprets: half the front's time of a small model's step
(docs/PERFORMANCE.md). The workers can run it themselves: the front names the parameters in the
forward's records as leaves (``LeafRef``), so each worker's forward builds the same autograd graph
native torch would, and a backward is then one ``moai::backward`` record
(daemons/worker/executor.py; on a job of several workers each runs it on its DTensors, the
gradient ops with the placement rules of the stream's ops: daemons/worker/spmd.py). The front
hands out the parameters' ``.grad`` at once, as handles of the gradients the worker will store,
and frees the tensors its own graph saved, as torch's backward frees them.

Only a plain backward goes this way; anything the worker's graph cannot reproduce is traced on
the front as before, with the same results:

- the call: one scalar device tensor with a graph, no ``gradient``, ``inputs``, ``retain_graph``
  or ``create_graph``; the ``remote_backward`` setting on; anomaly detection
  off (``torch.autograd.detect_anomaly`` checks each gradient op's results, with the forward's
  traceback: the front's);
- the graph: no custom ``autograd.Function`` (but the virtual device's own linear), no hook on a
  leaf, none on an inner tensor, a module or a graph's node (``register_hook``, ``retain_grad``,
  module backward hooks, ``grad_fn.register_hook`` and ``register_prehook``, also on a
  parameter's gradient accumulator: seen when registered), no saved-tensor hooks ever entered
  (checkpointing), no parameter of a ``DistributedDataParallel`` (its reducer hooks them in
  C++); every leaf a device tensor whose forward ops named it as a leaf.

A parameter's first backward is traced on the front and marks it a leaf (``LeafHandle``); the
backwards of graphs recorded after that run on the worker. A backward that must be traced unmarks
its parameters for good: a graph the worker built for them would only hold memory. A leaf that
only undefined gradients reach gets zeros, where torch leaves its ``.grad`` as it was (the front
hands gradients out before the worker computes them).
"""
from __future__ import annotations

import functools
import threading
import weakref

import torch
from torch.autograd.function import BackwardCFunction

from daemons.worker.pseudo_ops import BACKWARD_OP
from offload import session as sessions
from offload.linear import _Linear
from offload.tensor import LeafHandle, RemoteTensor

_ACCUMULATE_GRAD = type(torch.empty(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])
_OWN_FUNCTIONS = frozenset({_Linear._backward_cls})   # custom Functions the worker's graph has too
_saved_names: dict[type, tuple[str, ...]] = {}        # node type -> its saved tensors' attributes
_graph_hooks_seen = False
_traced: weakref.WeakSet = weakref.WeakSet()   # handles of leaves whose backwards stay traced
_DONE = "moai_backward_ran"   # in the root node's metadata once the worker ran its backward
_HOOKED_IN_CPP = "_moai_hooked_in_cpp"   # set in the __dict__ of DistributedDataParallel's parameters
_META = torch.device("meta")
_empty_strided = torch._C._VariableFunctions.empty_strided   # no Python reference kernel


def install():
    """Route ``torch.autograd.backward`` (``Tensor.backward`` calls it) through ``backward``."""
    if getattr(torch.autograd.backward, "_moai_remote", False):
        return
    original = torch.autograd.backward

    @functools.wraps(original)
    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                 grad_variables=None, inputs=None):
        plain = (grad_tensors is None and grad_variables is None and inputs is None and not retain_graph
                 and not create_graph)
        if _run_on_worker(tensors, plain):
            return None
        return original(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)

    backward._moai_remote = True
    torch.autograd.backward = backward
    for name in ("register_hook", "retain_grad"):   # a leaf's hooks are seen on the leaf itself
        _note_when_called(RemoteTensor, name, lambda t: not t.is_leaf)
    _note_when_called(torch.nn.Module, "register_backward_hook")   # it hooks grad_fn: never seen
    _note_node_hooks(torch.autograd.function._HookMixin)
    # Checkpointing, offloading to the host: the worker's graph would keep what they drop.
    _note_when_called(torch.autograd.graph.saved_tensors_hooks, "__enter__")
    _note_ddp_parameters(torch.nn.parallel.DistributedDataParallel)


def _note_graph_hook():
    """A hook on an inner tensor, a module or a node, or saved-tensor hooks: from now on every
    backward is traced on the front."""
    global _graph_hooks_seen
    _graph_hooks_seen = True


def _note_when_called(cls, name: str, applies=lambda obj: True):
    original = getattr(cls, name)

    @functools.wraps(original)
    def noted(self, *args, **kwargs):
        if applies(self):
            _note_graph_hook()
        return original(self, *args, **kwargs)

    setattr(cls, name, noted)


def _note_node_hooks(mixin: type):
    """``grad_fn.register_hook`` / ``register_prehook``, and the same on a parameter's gradient
    accumulator (Megatron's and DeepSpeed's way to learn that a gradient is ready): torch's nodes
    are immutable C++ types, and every such registration reaches Python only through this
    mixin's ``_register_hook``. The hook is on no tensor, so it is noted for every graph."""
    original = mixin._register_hook

    @functools.wraps(original)
    def _register_hook(backward_hooks, hook):
        _note_graph_hook()
        return original(backward_hooks, hook)

    mixin._register_hook = staticmethod(_register_hook)


def _note_ddp_parameters(ddp: type):
    """DistributedDataParallel's reducer hooks its parameters' gradient accumulators in C++, where
    the graph walk cannot see them: those parameters are noted so, and a graph with any of them is
    traced; other models of the process still run their backwards on the worker."""
    original = ddp.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for p in self.module.parameters():
            p.__dict__[_HOOKED_IN_CPP] = True

    ddp.__init__ = __init__


def _run_on_worker(tensors, plain: bool) -> bool:
    """Run this backward on the worker if it can; False: the caller traces it."""
    given = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    roots = [t for t in given if type(t) is RemoteTensor and t.grad_fn is not None]
    if not roots:
        return False
    session = sessions.current()
    if not session.runs_backward:
        return False
    session.stream.flush()   # the forward's last ops: the worker runs them while this walks
    if len(given) != 1:   # several losses at once (or gradient edges): traced
        for root in roots:
            _stay_traced(_walk(root.grad_fn)[1])
        return False
    loss = roots[0]
    nodes, leaves, reproducible = _walk(loss.grad_fn)
    grads = [v.grad for v in leaves]
    if not (plain and reproducible and loss.numel() == 1 and loss.is_floating_point()
            and not _graph_hooks_seen and not torch.nn.modules.module._global_backward_hooks
            and not torch.is_anomaly_enabled()
            and all(_worker_can_set(v, g) for v, g in zip(leaves, grads))):
        _stay_traced(leaves)
        return False
    # Sequence numbers count per thread: a graph is known to be recorded after the marking only
    # in the thread that marked (a program's forward and backward run in one thread).
    thread, first_node = threading.get_ident(), min(n._sequence_nr() for n in nodes)
    unmarked = [v for v in leaves if type(v._handle) is not LeafHandle
                or v._handle.marked_at[0] != thread or v._handle.marked_at[1] >= first_node]
    if unmarked:
        if not any(v._handle.plain in _traced for v in unmarked):
            _mark(unmarked)
        return False
    # The new gradients (not the pass's own temporaries): past the cap, raised before anything
    # of the backward happened.
    session.allocate(BACKWARD_OP, sum(v.numel() * v.element_size() for v, g in zip(leaves, grads)
                                      if g is None))
    metadata = loss.grad_fn.metadata
    if _DONE in metadata:
        _freed(None)
    metadata[_DONE] = True
    out = [session.new_id() if g is None else g._handle.id for g in grads]
    session.enqueue(BACKWARD_OP, [loss._handle.ref, [v._handle.ref for v in leaves],
                                  [None if g is None else g._handle.ref for g in grads]], {}, out)
    session.stream.flush()   # the worker starts it while the front goes on
    for v, g, tid in zip(leaves, grads, out):
        if g is None:
            v.grad = RemoteTensor(_empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META), tid)
    _release_saved(nodes)
    return True


def _stay_traced(leaves: list):
    """These parameters' backwards are traced from now on: graphs the worker built for them would
    only hold memory (all the activations of a checkpointed model, or those of a step whose
    backward is traced, until its loss dies)."""
    for v in leaves:
        v._handle = v._handle.plain
        _traced.add(v._handle)


def _worker_can_set(leaf: RemoteTensor, grad) -> bool:
    """Whether the gradient the worker stores can be this leaf's ``.grad``: none yet, or one of the
    leaf's shape and dtype on the device (not one the program set itself), and a leaf laid out
    densely: contiguous or channels-last (a CNN's convolution weights in ``channels_last``). The
    worker stores the gradient with the leaf's strides, as torch's AccumulateGrad gives a dense
    parameter's gradient its strides, so the layout is the same on both sides."""
    if not (leaf.is_contiguous() or leaf.is_contiguous(memory_format=torch.channels_last)
            or leaf.is_contiguous(memory_format=torch.channels_last_3d)):
        return False
    return grad is None or (type(grad) is RemoteTensor and grad.shape == leaf.shape
                            and grad.dtype == leaf.dtype)


def _walk(root) -> tuple[list, list, bool]:
    """(nodes, leaf device tensors, whether the worker's graph is the same) of the graph under
    ``root``."""
    nodes, leaves, leaf_ids = [], [], set()
    reproducible = True
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is _ACCUMULATE_GRAD:
            leaf = node.variable
            if type(leaf) is not RemoteTensor:
                reproducible = False
            elif id(leaf) not in leaf_ids:
                leaf_ids.add(id(leaf))
                leaves.append(leaf)
                if (leaf._backward_hooks or getattr(leaf, "_post_accumulate_grad_hooks", None)
                        or _HOOKED_IN_CPP in leaf.__dict__):
                    reproducible = False
            continue
        if isinstance(node, BackwardCFunction) and kind not in _OWN_FUNCTIONS:
            reproducible = False
        nodes.append(node)
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return nodes, leaves, reproducible


def _mark(leaves: list):
    """Name these parameters as leaves in the records from now on."""
    with torch.enable_grad():
        now = (threading.get_ident(), (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr())
    for v in leaves:
        v._handle = LeafHandle(v._handle.plain, now)


def _release_saved(nodes: list):
    """Drop the tensors the front's graph saved, as a backward without ``retain_graph`` does:
    the worker ran the backward, so keeping them would only keep remote tensors alive."""
    for node in nodes:
        kind = type(node)
        names = _saved_names.get(kind)
        if names is None:
            names = _saved_names[kind] = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
        for name in names:
            saved = getattr(node, name)
            for s in saved if isinstance(saved, (list, tuple)) else (saved,):
                if s is None:
                    continue
                try:
                    s.register_hooks(_forget, _freed)
                except RuntimeError as e:
                    if "already been set" in str(e):
                        _freed(None)   # a graph sharing this part ran its backward before


def _forget(tensor):
    return None


def _freed(_):
    raise RuntimeError("Trying to backward through the graph a second time (or directly access "
                       "saved tensors after they have already been freed). Saved intermediate "
                       "values of the graph are freed when you call .backward() or "
                       "autograd.grad(). Specify retain_graph=True if you need to backward "
                       "through the graph a second time or if you need to access saved tensors "
                       "after calling backward.")
