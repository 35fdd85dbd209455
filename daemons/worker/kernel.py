"""The worker's own implementation of an op that no device has a kernel for (the virtual
device's fused attention and linear: daemons/worker/fused_attention.py, fused_linear.py)."""
from __future__ import annotations


class Kernel:
    """Runs in place of an op that has no kernel here, and looks like it to the executor and
    the SPMD backend (name, tags, schema: the rules that read them see the op the front named)."""

    def __init__(self, op, fn):
        self.op, self.fn = op, fn
        self.tags, self._schema, self.is_view = op.tags, op._schema, op.is_view

    def name(self) -> str:
        return self.op.name()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
