"""Where each tensor of a multi-worker job lives: the placement rule of automatic parallelism.

The front marks uploads (``put``) with a hint, the body's ``shard``: ``"param" | "buffer" |
"batch"`` (absent: an ordinary tensor). From that and the worker's memory cap this module decides
the DTensor placement on the job's 1-D mesh of N workers:

- ``batch``: ``Shard(0)``, the batch is split over the workers (uneven splits allowed: rank r gets
  ``torch.chunk``'s r-th piece). Data parallelism.
- ``param``: ``Replicate()`` while the model fits, else ``Shard(0)`` (ZeRO-3 / FSDP style).
- ``buffer``, unhinted tensors and unknown hints: ``Replicate()``; so are tensors whose dim 0
  would leave a rank an empty piece (0-d included; 9 rows over 4 ranks: 3, 3, 3, 0). A hint
  changes where bytes live, never a result (spmd.py), so an unknown one is ignored rather than
  refused.

The memory rule. Training with Adam(W) holds four tensors per parameter on every worker that
replicates it: the parameter, its gradient and the two moments. With ``P`` the bytes of all
parameters uploaded so far (full size), the parameters are sharded as soon as

    ADAM_STATE_FACTOR * P  >  (1 - ACTIVATION_RESERVE) * memory_cap

i.e. when replicated parameters + gradients + optimizer state would leave less than
``ACTIVATION_RESERVE`` of the cap for activations. The decision is taken at the upload that
crosses the line; parameters uploaded before it are re-placed then (every worker sees the same
uploads in the same order, so all take the decision at the same point of the stream). Nothing
else is needed for ZeRO-3: a gradient (a ``Partial`` result) is reduce-scattered into the
placement of a parameter of its shape when produced (spmd.py), optimizer state made with ``zeros_like`` is
born ``Shard(0)``, and a parameter is all-gathered by DTensor where an op needs it whole.
"""
from __future__ import annotations

from torch.distributed.tensor import Placement, Replicate, Shard

# Parameter + gradient + Adam's exp_avg + exp_avg_sq, all of the parameter's size.
ADAM_STATE_FACTOR = 4
# Share of the memory cap kept for activations and temporaries when deciding to shard.
ACTIVATION_RESERVE = 0.25


class PlacementPolicy:
    """Pure state: takes uploads in stream order, answers their placement."""

    def __init__(self, world_size: int, memory_cap: int):
        self.world_size = world_size
        self.memory_cap = memory_cap
        self.param_bytes = 0
        self.shard_params = False

    def admit(self, kind: str | None, nbytes: int) -> bool:
        """Account one upload; True when it is the one that switches parameters to sharded."""
        if kind != "param" or self.shard_params or self.world_size == 1:
            return False
        self.param_bytes += nbytes
        budget = (1 - ACTIVATION_RESERVE) * self.memory_cap
        self.shard_params = ADAM_STATE_FACTOR * self.param_bytes > budget
        return self.shard_params

    def placement(self, kind: str | None, shape) -> Placement:
        # A dim 0 that would leave a rank an empty piece is not split: a view that drops the dim
        # (a [1, n] bias gradient viewed as [n]) could not stay local, and an op fails on an empty
        # piece where it runs on the others (``max()`` of 6 values on 4 workers, pieces 2, 2, 2
        # and 0: that rank fell back to whole tensors while the others all-reduced; the job hung
        # until the collective timeout).
        if len(shape) == 0 or not self.splits_without_empty_pieces(shape[0]):
            return Replicate()
        if kind == "batch" or (kind == "param" and self.shard_params):
            return Shard(0)
        return Replicate()

    def splits_without_empty_pieces(self, n: int) -> bool:
        """Whether ``torch.chunk``'s split of ``n`` (DTensor's ``Shard``) gives every rank rows:
        9 rows over 4 ranks are pieces of 3, 3, 3 and 0."""
        piece = -(-n // self.world_size)
        return n > 0 and -(-n // piece) == self.world_size
