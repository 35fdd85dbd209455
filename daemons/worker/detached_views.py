"""Views DTensor had to copy, kept in step with the tensors they view.

On one device a view shares its base's memory: a write through either shows in the other
(``mask[0, 28:] = 0``, ``x[:3].copy_(y)``, ``rows = x.unbind(0)`` and a write into a row, a row
read after its tensor was scaled). DTensor makes a view across the sharded dim (a row of a
batch-sharded tensor, a slice or split of its rows) by redistributing its input first, so the
result is a copy: a write into it, or into its base, never reached the other. transformers'
padding mask lost its padding that way on two workers, silently.

``DetachedViews`` records each such view with the op that made it. After an op writes a storage
(through any tensor over it), the views living in that storage are written back into their bases
and the views of that storage are made again from it; both spread on up and down the chain of
views. These are copies of data only, under ``no_grad``: autograd already treats the DTensor as a
view of its base (an in-place op through it rebases the base's history). They are made on whole
tensors, an all-gather where one device writes in place, paid only by programs that write through
such a view or into the base of a live one.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.utils._pytree import tree_flatten

from daemons.worker import layout


@dataclass(eq=False)
class _View:
    """One detached view: its base, how it was made from it, and where its values live. The view's
    own DTensor may be gone while other tensors over its storage live (``x[0][28:]`` keeps only
    the slice), so the view is remade over the storage from its geometry when needed."""
    base: DTensor
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    index: int | None            # which result of a view op with several (split, unbind)
    storage: weakref.ref
    spec: tuple                  # local (size, stride, offset), global (shape, stride), placements
    dtype: torch.dtype

    def of(self, whole: torch.Tensor) -> torch.Tensor:
        """This view of ``whole``, the base's whole value laid out as on one device."""
        out = self.op(whole, *self.args, **self.kwargs)
        return out if self.index is None else out[self.index]

    def dtensor(self, mesh) -> DTensor:
        (size, stride, offset), (shape, global_stride), placements = self.spec
        piece = torch.empty(0, dtype=self.dtype, device=self.base.device)
        piece.set_(self.storage(), offset, size, stride)
        return DTensor.from_local(piece, mesh, placements, run_check=False, shape=shape, stride=global_stride)


def _storage_key(t: DTensor) -> int:
    # The storage's Python object lives as long as the storage does (torch keeps it), so its id
    # names the storage on every rank alike, empty local pieces included.
    return id(t._local_tensor.untyped_storage())


def _written_positions(op) -> tuple[tuple[int, str], ...]:
    return tuple((i, a.name) for i, a in enumerate(op._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


class DetachedViews:
    """The detached views of one job's tensors on this worker (module docstring). ``piece(whole,
    placement)`` cuts this rank's part of a whole tensor (``SpmdBackend._slice``)."""

    def __init__(self, mesh, piece: Callable[[torch.Tensor, object], DTensor],
                 metadata_only: frozenset):
        self.mesh = mesh
        self._piece = piece
        self._metadata_only = metadata_only      # in-place ops that change a view, not values
        self._in_storage: dict[int, list[_View]] = defaultdict(list)   # the view's values there
        self._of_storage: dict[int, list[_View]] = defaultdict(list)   # its base's values there
        self._kinds: dict = {}

    def __len__(self) -> int:
        return sum(map(len, self._in_storage.values()))

    def after(self, op, args, kwargs, out):
        """Bookkeeping after ``op`` ran: a view it made as a copy is recorded; a storage it wrote
        is spread to the views in and of it."""
        kind = self._kinds.get(op)
        if kind is None:
            writes = () if op in self._metadata_only else _written_positions(op)
            kind = self._kinds[op] = (op.is_view, writes)
        is_view, writes = kind
        if is_view and args and isinstance(args[0], DTensor):
            self._record(op, args, kwargs, out)
        if writes and (self._in_storage or self._of_storage):
            for i, name in writes:
                value = args[i] if i < len(args) else kwargs.get(name)
                for t in tree_flatten(value)[0]:
                    if isinstance(t, DTensor):
                        self._written(_storage_key(t))

    # --- recording --------------------------------------------------------------------------------
    def _record(self, op, args, kwargs, out):
        base = args[0]
        base_storage = base._local_tensor.untyped_storage()
        several = isinstance(out, (list, tuple))
        for index, view in enumerate(out if several else (out,)):
            if not isinstance(view, DTensor):
                continue
            local = view._local_tensor
            storage = local.untyped_storage()
            if storage is base_storage:
                continue                                   # a true view: nothing to keep in step
            entry = _View(base, op, tuple(args[1:]), dict(kwargs), index if several else None,
                          weakref.ref(storage),
                          ((local.shape, local.stride(), local.storage_offset()),
                           (view.shape, view.stride()), view.placements), view.dtype)
            key, base_key = id(storage), id(base_storage)
            self._in_storage[key].append(entry)
            self._of_storage[base_key].append(entry)
            weakref.finalize(storage, self._forget, key, base_key, entry)

    def _forget(self, key: int, base_key: int, entry: _View):
        for table, k in ((self._in_storage, key), (self._of_storage, base_key)):
            entries = table.get(k)
            if entries is not None and entry in entries:
                entries.remove(entry)
                if not entries:
                    del table[k]

    # --- keeping views and bases in step ----------------------------------------------------------
    def _written(self, key: int):
        with torch.no_grad():
            self._up(key)
            self._down(key, skip=())

    def _up(self, key: int):
        """The views living in storage ``key`` were written: into their bases with them, then on to
        the bases' own bases and the bases' other views."""
        entries = list(self._in_storage.get(key, ()))
        by_base: dict[int, list[_View]] = defaultdict(list)
        for entry in entries:
            by_base[id(entry.base)].append(entry)
        for group in by_base.values():
            base = group[0].base
            whole = self._whole(base)
            for entry in group:
                entry.of(whole).copy_(self._whole(entry.dtensor(self.mesh)))
            base._local_tensor.copy_(self._piece(whole, base.placements[0]).to_local())
        # In the entries' order, which every rank shares (the keys differ): the collectives match.
        for base_key in dict.fromkeys(_storage_key(e.base) for e in entries):
            self._up(base_key)
            self._down(base_key, skip=entries)

    def _down(self, key: int, skip):
        """Storage ``key`` was written: the views made from it are made again, and theirs."""
        entries = [e for e in self._of_storage.get(key, ()) if e not in skip]
        wholes: dict[int, torch.Tensor] = {}
        for entry in entries:
            base = entry.base
            whole = wholes.get(id(base))
            if whole is None:
                whole = wholes[id(base)] = self._whole(base)
            view = entry.dtensor(self.mesh)
            view._local_tensor.copy_(self._piece(entry.of(whole).contiguous(), view.placements[0]).to_local())
        for key_of_view in dict.fromkeys(id(e.storage()) for e in entries):
            self._down(key_of_view, skip=())

    @staticmethod
    def _whole(t: DTensor) -> torch.Tensor:
        return layout.laid_out_like(t.full_tensor(), t)
