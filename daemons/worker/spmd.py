"""SPMD execution of one job's op stream on N workers: the worker side of automatic parallelism.

Every worker of a job receives the same op stream (docs/PROTOCOL.md, Worker) and runs it on
DTensors over a 1-D DeviceMesh of the job's workers; DTensor does the sharding propagation and the
collectives. A DTensor always means its *global* value, so the placement of a tensor decides only
where its bytes live and what moves, never the numbers: that is why a wrong or missing upload hint
costs speed, not correctness. The rules (docs/PARALLELISM.md):

- uploads are placed by ``placement.py``: batches ``Shard(0)``, parameters ``Replicate()`` (or
  ``Shard(0)`` once replicated training state would not fit: ZeRO-3);
- a ``Partial`` result (a gradient summed over the local batch, a loss summed over it) is reduced
  at once into the placement a parameter of its shape has: all-reduce while parameters are
  replicated, reduce-scatter when they are sharded. Reducing when produced, like DDP, keeps every
  later reader (Adam reads each gradient three times) from reducing it again;
- random ops run on whole tensors on every worker: the workers share the seed, so each draws the
  numbers one device would have drawn and keeps its own slice;
- an op DTensor has no sharding rule for runs as its aten decomposition, else on whole tensors
  (its inputs are all-gathered); its results take the placement of an input of the same shape,
  else ``Replicate()``;
- a view DTensor can only make as a copy (across the sharded dim) is kept in step with its base:
  writes through either reach the other (``detached_views.py``);
- a backward run here (``moai::backward``) gives the gradient ops autograd calls the same rules,
  through a dispatch mode (``StreamRules``): the gradients come out as the front's traced ops
  would make them.

``SpmdExecutor`` is the executor of a job with ``world_size > 1`` (main.py picks it): it reuses the
single-worker ``Executor`` and changes only where a tensor comes from (``put``), how an op runs
(``_op``, and ``_autograd_ops`` for a backward's ops), how a result leaves (``fetch``: a
collective every rank joins, rank 0 carries the data) and what memory counts (this worker's
shards).
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch._decomp import decomposition_table
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._decompositions import DecompShardingStrategy
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from daemons import wire
from daemons.worker import collectives, fused_attention, fused_linear, layout
from daemons.worker.detached_views import DetachedViews
from daemons.worker.executor import Executor, MemoryMeter
from daemons.worker.group_faults import GroupBroken, GroupFaults
from daemons.worker.kernel import Kernel
from daemons.worker.placement import PlacementPolicy
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.worker.spmd")


aten = torch.ops.aten
# In-place random ops that overwrite every element of their first argument without reading it.
RANDOM_FILLS = frozenset((aten.bernoulli_.float, aten.uniform_.default, aten.normal_.default,
                          aten.exponential_.default, aten.geometric_.default,
                          aten.log_normal_.default, aten.cauchy_.default, aten.random_.default,
                          getattr(aten.random_, "from"), aten.random_.to))


# Decompositions written in aten ops, which autograd can differentiate when a forward records them;
# torch._refs' (the rest of the table) end in prims, which it cannot.
ATEN_DECOMPOSITIONS = {op: fn for op, fn in decomposition_table.items()
                       if fn.__module__ == "torch._decomp.decompositions"}


# A DTensor's shape and placement cannot change in place: the out-of-place view stands in for an
# in-place one (torch's GRU ``transpose_``s its batch_first output), and the executor stores
# it under the tensor's id.
OUT_OF_PLACE_VIEWS = {aten.transpose_.default: aten.transpose.int, aten.t_.default: aten.t.default,
                      aten.unsqueeze_.default: aten.unsqueeze.default,
                      aten.squeeze_.default: aten.squeeze.default, aten.squeeze_.dim: aten.squeeze.dim,
                      aten.squeeze_.dims: aten.squeeze.dims}

# ATen re-strides a result's size-1 dims with ``as_strided_`` (adaptive_avg_pool2d to 1x1 of a
# channels_last input: its (N, C, 1, 1) mean), which DTensor cannot run: on whole tensors it ran at
# every step, and failed in a forward that builds the worker's graph (an in-place write into
# DTensor's view of its local tensor). A stride of a size-1 dim addresses nothing, so such a
# call is the tensor itself (in place) or an alias of it.
AS_STRIDED = frozenset((aten.as_strided.default, aten.as_strided_.default))


def _restrides_unit_dims_only(t, size, stride, storage_offset=None) -> bool:
    return (tuple(size) == tuple(t.shape)
            and (storage_offset is None or storage_offset == t.storage_offset())
            and all(n == 1 or a == b for n, a, b in zip(size, stride, t.stride())))


# DTensor's rule for these averages the ranks' means of their targets' losses (``Partial("avg")``):
# the mean over the batch only when every rank's targets weigh the same in total, not with class
# weights or ignored targets (the -100 of padding): a cross-entropy then read 2.48 for 2.33 on two
# workers. Their decompositions divide by the total weight of the whole batch.
MEANS_OF_LOCAL_MEANS = frozenset((aten.nll_loss_forward.default, aten.nll_loss2d_forward.default))


def _no_derived_rules():
    """DTensor derives a rule for an op without one from the op's decomposition, but then runs the
    op's own kernel on each rank's piece: ops normalized by a size along the split dim come out
    wrong. ``mse_loss_backward``'s gradient was N times too large on N workers (it divides by the
    local element count), a mean ``mse_loss`` over an uneven split the mean of local means.
    Without derived rules such an op fails its dispatch and ``SpmdBackend._call`` runs the
    decomposition itself, each part by its own rule."""
    if hasattr(DecompShardingStrategy, "has_decomp"):
        DecompShardingStrategy.has_decomp = staticmethod(lambda op: False)


HALF_DTYPES = (torch.bfloat16, torch.float16)
LINEAR_KERNELS = frozenset(fused_linear.KERNELS.values())
# Products whose inner dim may be split: where its two matrices are among the arguments, and the
# dim each contracts (``mm(a, b)``: a's dim 1, b's dim 0). The .dtype overloads are the worker's
# kernels (accumulating_matmul.py), found by the op they stand in for.
HALF_CONTRACTIONS = {
    **dict.fromkeys((aten.mm.default, aten.mm.dtype), ((0, 1), (1, 0))),
    **dict.fromkeys((aten.addmm.default, aten.addmm.dtype), ((1, 1), (2, 0))),
    **dict.fromkeys((aten.bmm.default, aten.bmm.dtype), ((0, 2), (1, 1))),
    **dict.fromkeys((aten.baddbmm.default, aten.baddbmm.dtype), ((1, 2), (2, 1))),
}


def _is_half(t) -> bool:
    return isinstance(t, DTensor) and t.dtype in HALF_DTYPES


def _contracts_split_halves(args, matrices) -> bool:
    """Whether a product multiplies half-precision matrices one of which is split along the dim
    it contracts: each worker then holds a partial sum."""
    if not all(_is_half(args[i]) for i, _ in matrices):
        return False
    return any(args[i].placements[0] == Shard(dim) for i, dim in matrices)


HALF_SUMS = frozenset((aten.sum.default, aten.sum.dim_IntList))


def _sums_split_half(args, kwargs) -> bool:
    """Whether a sum adds a half-precision tensor's values across the workers it is split over:
    one device sums them in float32 and rounds once (the gradient of a bias, over the batch)."""
    t = args[0]
    if not (_is_half(t) and kwargs.get("dtype") is None and t.placements[0].is_shard()):
        return False
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    return not dims or t.placements[0].dim in [d % t.ndim for d in dims]


DTENSOR_REFUSALS = ("Sharding propagation failed", "as_strided not supported with DTensor")


def _refused_by_rules(exc: Exception) -> bool:
    """Whether DTensor refused an op on its metadata alone (no sharding rule, a rule's refusal,
    ``as_strided`` that is not a view it can make): the same on every rank, unlike an error of
    the kernel on this rank's piece."""
    return isinstance(exc, NotImplementedError) or any(words in str(exc) for words in DTENSOR_REFUSALS)


def _draws_random(op, args, kwargs) -> bool:
    """Whether an op draws random numbers (rule 2: it then runs whole). Attention ops are tagged
    random for their dropout; with ``dropout_p`` 0 (the default) they draw nothing."""
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    names = [a.name for a in op._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    return bool(kwargs.get("dropout_p", args[i] if i < len(args) else 0.0))


# DTensor has no rules for the CPU flash attention (CUDA's has them): the backward ran on
# all-gathered whole tensors in every attention layer, the forward all-gathered q, k and v.
# Attention is independent per batch element, so batch-sharded attention is exact. The mask
# (``attn_mask``, a keyword argument, which DTensor counts after the positional ones) is sharded
# with the batch when it has one (a padding mask: transformers' (B, 1, S, S)) and replicated when
# it is broadcast over the batch (a causal (S, S)). DTensor never moves a keyword argument's data,
# so the rule takes the mask as it is placed: ``SpmdBackend._call`` places it so before the
# virtual device's attention ops (ATTENTION_MASKS). With dropout the forward runs whole (rule 2).
def _mask_sharded_with_batch(mask, query) -> bool:
    """Whether an attention mask holds the query's batch (rather than being broadcast over it)."""
    return mask.ndim == query.ndim and mask.shape[0] == query.shape[0] > 1


def _attention_strategy(op_schema, results: int, batched: int):
    """Batch-sharded when an input is and the mask is placed for it, else all replicated (one
    strategy: DTensor would choose by cost, and may not move the mask). ``batched`` leading
    tensor inputs hold the batch, the first is the query."""
    args = [a for a in op_schema.args_schema if hasattr(a, "strategies")]
    mask = op_schema.kwargs_schema.get("attn_mask")
    inputs = args + ([mask] if hasattr(mask, "strategies") else [])
    now = [a.strategies[0].output_spec.placements[0] for a in inputs]
    sharded = [Shard(0)] * (results + batched) + [Replicate()] * (len(args) - batched)
    if len(inputs) > len(args):
        sharded.append(Shard(0) if _mask_sharded_with_batch(mask, args[0]) else Replicate())
    use_sharded = Shard(0) in now and (len(inputs) == len(args) or now[-1] == sharded[-1])
    strategy = sharded if use_sharded else [Replicate()] * (results + len(inputs))
    return expand_to_full_mesh_op_strategy(op_schema.get_mesh_from_args(validate=False), op_schema,
                                           [strategy], input_index=results)


@register_op_strategy(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _cpu_flash_attention(op_schema):
    # [out, logsumexp, q, k, v, (attn_mask)]
    return _attention_strategy(op_schema, results=2, batched=3)


@register_op_strategy(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _cpu_flash_attention_backward(op_schema):
    # [grad_q, grad_k, grad_v, grad_out, q, k, v, out, logsumexp, (attn_mask)]
    return _attention_strategy(op_schema, results=3, batched=6)


# The virtual device's attention ops (daemons/worker/fused_attention.py) -> where their query and
# mask are among the arguments (positional there, a keyword argument of the CPU kernels they call).
ATTENTION_MASKS = {fused_attention.KERNELS[fused_attention.FORWARD]: (0, 3),
                   fused_attention.KERNELS[fused_attention.BACKWARD]: (1, 4)}


class SpmdBackend:
    """The job's process group and mesh, and DTensor execution of its ops on this worker."""

    def __init__(self, spec: WorkerSpec):
        self.device = torch.device(spec.device)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(self.device)
        # The timeout bounds how long a worker waits in a collective for a peer that hangs; a
        # peer that dies is noticed at once (its connections close). The store is the one
        # ``init_method`` would make, kept: the ranks agree through it after an error.
        timeout = timedelta(seconds=spec.collective_timeout_s)
        rendezvous = urlsplit(spec.rendezvous)
        store = dist.TCPStore(rendezvous.hostname, rendezvous.port, spec.world_size,
                              is_master=spec.rank == 0, timeout=timeout)
        dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=spec.rank,
                                world_size=spec.world_size, timeout=timeout)
        self.faults = GroupFaults(store, spec.rank, spec.world_size, spec.out_of_step_s)
        self.mesh = init_device_mesh(self.device.type, (spec.world_size,))
        collectives.install()
        _no_derived_rules()
        self.policy = PlacementPolicy(spec.world_size, spec.memory_cap)
        self.fallbacks: Counter[str] = Counter()
        self.decomposed: Counter[str] = Counter()
        # Uploads by hint and the placement they got ("batch -> shard": 6): shows what a real
        # program's hints did (logged at exit, in memory_stats).
        self.placed: Counter[str] = Counter()
        # Storages of the parameters uploaded replicated: re-placed if ZeRO-3 switches on.
        self._param_storages: set[int] = set()
        self.views = DetachedViews(self.mesh, self._slice, frozenset(OUT_OF_PLACE_VIEWS) | AS_STRIDED)
        self._nested = False

    # --- uploads ----------------------------------------------------------------------------------
    def place(self, tid: int, tensor: torch.Tensor, kind: str | None) -> tuple[DTensor, bool]:
        """Place an upload (every rank receives the same whole tensor): its table entry, and whether
        it switched parameters to sharded (the caller then re-places the table with ``reshard``)."""
        switched = self.policy.admit(kind, tensor.numel() * tensor.element_size())
        placement = self.policy.placement(kind, tensor.shape)
        self.placed[f"{kind or 'untagged'} -> {'shard' if placement.is_shard() else 'replicate'}"] += 1
        placed = self._slice(tensor, placement)
        if switched:
            log.info("parameters (%d bytes) exceed the replicated budget: sharding them (ZeRO-3)",
                     self.policy.param_bytes)
        elif kind == "param" and not self.policy.shard_params:
            self._param_storages.add(placed.to_local().untyped_storage().data_ptr())
        return placed, switched

    def reshard(self, t, done: dict[int, DTensor]) -> DTensor | None:
        """At the ZeRO-3 switch: ``t`` as a sharded parameter if it is a whole replicated parameter
        uploaded before (the upload itself, or an alias of it: the front's ``nn.Parameter`` is one),
        else None. ``done`` maps a storage to its new entry, so aliases stay one tensor."""
        if not isinstance(t, DTensor) or not t.placements[0].is_replicate():
            return None
        piece = t.to_local()
        storage = piece.untyped_storage()
        whole = (piece.storage_offset() == 0 and piece.is_contiguous()
                 and piece.numel() * piece.element_size() == storage.nbytes())
        if not whole or storage.data_ptr() not in self._param_storages:
            return None
        placement = self.policy.placement("param", t.shape)
        if not placement.is_shard():
            return None
        if storage.data_ptr() not in done:
            done[storage.data_ptr()] = self._slice(piece, placement)
            self.placed["param re-placed -> shard"] += 1
        return done[storage.data_ptr()]

    def _slice(self, full: torch.Tensor, placement) -> DTensor:
        # Every rank holds the same whole tensor: cutting out this rank's piece needs no traffic.
        placed = self._replicated(full).redistribute(self.mesh, [placement])
        if not placement.is_shard():
            return placed
        # The piece is a view of the whole tensor's storage: copied out, the whole one can go.
        return DTensor.from_local(placed.to_local().clone(), self.mesh, [placement], run_check=False,
                                  shape=placed.shape, stride=placed.stride())

    def _replicated(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
            return DTensor.from_local(t.to(self.device), self.mesh, [Replicate()], run_check=False)
        return t

    # --- ops --------------------------------------------------------------------------------------
    def call(self, op, *args, **kwargs):
        """Run one aten op with the global semantics of one device (module docstring)."""
        return self._guarded(op, self._call_in_step, op, args, kwargs)

    def _call_in_step(self, op, args, kwargs):
        # The ops an op is made of (a decomposition's, the views' own upkeep) are its parts: only
        # the outermost op's views and writes are kept in step (detached_views.py).
        if self._nested:
            return self._call(op, args, kwargs)
        self._nested = True
        try:
            out = self._call(op, args, kwargs)
            self.views.after(op, args, kwargs, out)
        finally:
            self._nested = False
        return out

    def _call(self, op, args, kwargs):
        op = OUT_OF_PLACE_VIEWS.get(op, op)
        args, kwargs = tree_map(self._replicated, (args, kwargs))
        if op in ATTENTION_MASKS:
            args = self._mask_placed(args, *ATTENTION_MASKS[op])
        if op in AS_STRIDED and isinstance(args[0], DTensor) and _restrides_unit_dims_only(*args, **kwargs):
            return args[0] if op is aten.as_strided_.default else aten.alias.default(args[0])
        if not any(isinstance(t, DTensor) for t in tree_flatten((args, kwargs))[0]):
            return tree_map(self._replicated, op(*args, **kwargs))   # factories: arange, randn...
        if _draws_random(op, args, kwargs):
            return self._run_whole(op, args, kwargs)
        if op in MEANS_OF_LOCAL_MEANS:
            out = self._decomposed(op, args, kwargs)
            if out is not None:
                return tree_map(self._reduce_partial, out)
        if op in LINEAR_KERNELS and any(map(_is_half, args)):
            # Its products and sums take these rules one by one: a half-precision weight
            # gradient sums over the split batch (HALF_CONTRACTIONS). Not in float32, where
            # that costs a dispatch per part (a 2-GPU fp32 step took 15-20% longer).
            with StreamRules(self):
                return tree_map(self._reduce_partial, op(*args, **kwargs))
        contraction = HALF_CONTRACTIONS.get(op.op if isinstance(op, Kernel) else op)
        if contraction is not None and _contracts_split_halves(args, contraction):
            return self._contracted_in_float32(op, args, kwargs)
        if op in HALF_SUMS and _sums_split_half(args, kwargs):
            return self._reduce_partial(op(*args, **{**kwargs, "dtype": torch.float32})).to(args[0].dtype)
        try:
            out = op(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except (NotImplementedError, RuntimeError) as exc:
            # No sharding rule, or one DTensor refuses without moving data first (a view across
            # the sharded dim): the op's decomposition, whose parts have rules, else whole
            # tensors. A genuine error of the op fails again on whole tensors, with the message
            # one device would give. The kernel's own error may be this rank's alone (its piece
            # of the data): the fallback's collectives are joined only once every rank failed.
            if not _refused_by_rules(exc):
                self.faults.settle(exc, op.name())
            out = self._decomposed(op, args, kwargs)
            if out is None:
                self.fallbacks[op.name()] += 1
                log.debug("%s runs on whole tensors: %s", op.name(), exc)
                return self._run_whole(op, args, kwargs)
        return tree_map(self._reduce_partial, out)

    def _contracted_in_float32(self, op, args, kwargs):
        """A half-precision product over a split inner dim, as one device computes it: summed in
        float32 (each worker's part, then the all-reduce) and rounded once. In the half dtype
        each worker's part was rounded before the sum (up to 0.016 off at magnitude 4 on 4
        workers); the parts of bfloat16 or float16 values multiply exactly in float32."""
        packet = op.op.overloadpacket if isinstance(op, Kernel) else op.overloadpacket
        tensors = args[:-1] if isinstance(op, Kernel) else args   # a .dtype overload's last: out_dtype
        dtype = args[-1] if isinstance(op, Kernel) else next(
            a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in HALF_DTYPES)
        wide = [a.to(torch.float32) if isinstance(a, torch.Tensor) and a.dtype in HALF_DTYPES else a
                for a in tensors]
        return self._reduce_partial(packet.default(*wide, **kwargs)).to(dtype)

    def _mask_placed(self, args, query_at: int, mask_at: int):
        """``args`` with the attention mask placed as the CPU kernels' rule takes it: sharded
        when it holds the batch and an input is batch-sharded, else replicated."""
        query, mask = args[query_at], args[mask_at] if len(args) > mask_at else None
        if not isinstance(mask, DTensor) or not isinstance(query, DTensor):
            return args
        sharded = any(isinstance(a, DTensor) and a.placements[0] == Shard(0)
                      for i, a in enumerate(args) if i != mask_at)
        with_batch = sharded and _mask_sharded_with_batch(mask, query)
        placement = Shard(0) if with_batch else Replicate()
        if mask.placements[0] == placement:
            return args
        args = list(args)
        args[mask_at] = mask.redistribute(self.mesh, [placement])
        return args

    def _decomposed(self, op, args, kwargs):
        """``op`` run as its decomposition, each part with these rules (``StreamRules``); None
        when it has none or a part fails."""
        decomposition = ATEN_DECOMPOSITIONS.get(op)
        if decomposition is None:
            return None
        try:
            with StreamRules(self):
                out = decomposition(*args, **kwargs)
        except (torch.OutOfMemoryError, GroupBroken):
            raise
        except (NotImplementedError, RuntimeError) as exc:
            log.debug("%s's decomposition failed: %s", op.name(), exc)
            return None
        self.decomposed[op.name()] += 1
        return out

    def _guarded(self, what, fn, *args):
        """``fn(*args)``; on an error, the ranks settle whether the job can go on (group_faults.py).
        ``what`` (an op, or words) names it in the error."""
        self.faults.check()
        try:
            return fn(*args)
        except Exception as exc:
            self.faults.settle(exc, what if isinstance(what, str) else what.name())
            raise

    def _reduce_partial(self, t):
        if isinstance(t, DTensor) and any(p.is_partial() for p in t.placements):
            return t.redistribute(self.mesh, [self.policy.placement("param", t.shape)])
        return t

    def _run_whole(self, op, args, kwargs):
        sources: dict[int, DTensor] = {}        # id(whole tensor) -> the DTensor it came from
        shaped: dict[torch.Size, DTensor] = {}  # shape -> an input of that shape

        def gather(t):
            if not isinstance(t, DTensor):
                return t
            # A random fill reads nothing of the tensor it writes (dropout's mask buffer): skip
            # the all-gather, only the shape matters. Either way laid out as on one device
            # (layout.py): a later view may depend on it.
            if op in RANDOM_FILLS and t is args[0]:
                whole = torch.empty_strided(t.shape, layout.preserved_strides(t), dtype=t.dtype,
                                            device=self.device)
            else:
                whole = layout.laid_out_like(t.full_tensor(), t)
            sources[id(whole)] = t
            shaped.setdefault(t.shape, t)
            return whole

        out = op(*tree_map(gather, args), **tree_map(gather, kwargs))

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            source = sources.get(id(t))
            if source is None:
                like = shaped.get(t.shape)
                return self._slice(t, like.placements[0]) if like is not None else self._replicated(t)
            placement = source.placements[0]
            if t.shape != source.shape:
                # ``resize_`` changed the tensor's shape, which a DTensor's cannot in place: the
                # resized tensor is a new one, stored under the tensor's id (OUT_OF_PLACE_VIEWS).
                return self._slice(t, placement if t.ndim else Replicate())
            # An in-place / out= result: write it back into the input, in the input's placement.
            source.to_local().copy_(self._slice(t, placement).to_local())
            return source
        return tree_map(wrap, out)

    # --- results ----------------------------------------------------------------------------------
    def full_tensor(self, t) -> torch.Tensor:
        """The whole value (a collective: every rank calls it at the same point of the stream)."""
        return self._guarded("reading a tensor", DTensor.full_tensor, t) if isinstance(t, DTensor) else t

    def stats(self) -> dict:
        """Counters of what parallel execution cost so far: collective bytes, the ops run as their
        decompositions or on whole tensors by name, and the detached views kept in step now."""
        return {"collective_bytes": dict(collectives.BYTES), "fallbacks": dict(self.fallbacks),
                "decomposed": dict(self.decomposed), "uploads": dict(self.placed),
                "detached_views": len(self.views)}

    def close(self):
        log.info("uploads by hint -> placement: %s", dict(self.placed))
        if self.decomposed:
            log.info("ops run as their decompositions (no sharding rule): %s", dict(self.decomposed))
        if self.fallbacks:
            log.info("ops run on whole tensors (no sharding rule): %s", dict(self.fallbacks))
        dist.destroy_process_group()


class StreamRules(TorchDispatchMode):
    """Ops called past the stream's records go through ``SpmdBackend.call`` as the records' ops
    do: the gradient ops autograd calls in a backward run here (``moai::backward``), and the parts
    of a decomposition. So gradients summed over the local batch are reduced when produced, and a
    gradient op DTensor has no rule for, or fails (``native_group_norm_backward`` checks the local
    batch's gradient against the global batch size), runs as its decomposition or on whole
    tensors, as a backward traced on the front would. The mode is in autograd's thread-local
    state: a GPU worker's backward threads see it too."""

    def __init__(self, backend: SpmdBackend):
        super().__init__()
        self.backend = backend

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if DTensor in types:
            return self.backend.call(func, *args, **(kwargs or {}))
        # Plain tensors are the local parts of a graph: the whole tensors an op run on whole
        # tensors computed with, the local pieces DTensor's own autograd functions pass back.
        return func(*args, **(kwargs or {}))


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of a table entry (the entry itself when it is a plain tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


class ShardMeter(MemoryMeter):
    """The memory cap counts the bytes this worker holds: its shards, not global sizes."""

    def add(self, t: torch.Tensor):
        super().add(local(t))

    def remove(self, t: torch.Tensor):
        super().remove(local(t))


class SpmdExecutor(Executor):
    """The executor of one rank of a multi-worker job (module docstring)."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.meter = ShardMeter()
        self.backend = SpmdBackend(spec)
        self._calls: dict[str, functools.partial] = {}

    def _host_state(self, state) -> torch.Tensor:
        # The uploaded state is a (replicated) DTensor here; the generator takes a plain one.
        return local(state).cpu()

    def _op(self, name: str):
        call = self._calls.get(name)
        if call is None:
            op = super()._op(name)
            call = self._calls[name] = functools.partial(self.backend.call, op)
            call._schema = op._schema   # the executor reads it for an op given a leaf to write
        return call

    def _autograd_ops(self):
        return StreamRules(self.backend)

    def put(self, msg):
        body = msg.body
        tid, tensor = wire.field(body, "id", int), wire.field(body, "tensor", torch.Tensor)
        placed, switched = self.backend.place(tid, tensor, wire.field(body, "shard", str, None))
        self._store(tid, placed)
        if switched:
            # Parameters uploaded before are re-placed with every alias of them in the table (the
            # program holds the aliases); the replicated storage goes with the last reference.
            done: dict[int, DTensor] = {}
            for other, t in list(self.tensors.items()):
                sharded = self.backend.reshard(t, done)
                if sharded is not None:
                    self._store(other, sharded)
        return wire.NO_REPLY

    def fetch(self, msg):
        entry = super().fetch(msg)["tensor"]
        try:
            whole = self.backend.full_tensor(entry)
        except GroupBroken as exc:
            raise wire.RequestError(exc.wire_code, f"fetch of tensor #{msg.body['id']}: {exc}") from None
        return {"tensor": whole if self.spec.rank == 0 else None}

    def memory_stats(self, msg):
        return {**super().memory_stats(msg), **self.backend.stats()}

    def set_memory_fraction(self, msg):
        reply = super().set_memory_fraction(msg)
        # Parameters uploaded from now on are placed against the lowered cap (ZeRO-3 sooner).
        self.backend.policy.memory_cap = self.memory_cap
        return reply

    def close(self):
        super().close()
        self.backend.close()
