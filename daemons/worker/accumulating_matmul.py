"""Matrix products with an output dtype (``torch.mm(a, b, out_dtype=torch.float32)`` on bfloat16
or float16 matrices), which torch implements for CUDA only.

The virtual device is CUDA to the program, so programs take CUDA's paths: the chunked
``F.linear_cross_entropy`` in bfloat16 accumulates its gradients this way. A worker on a GPU runs
torch's kernel; a CPU worker computes the product in the output dtype from exact conversions of
the inputs, which is what CUDA's kernel accumulates in.
"""
from __future__ import annotations

import torch

from daemons.worker.kernel import Kernel

aten = torch.ops.aten
_PRODUCTS = ("mm", "bmm", "addmm", "baddbmm")


def _kernel(name: str, overload: str) -> Kernel:
    packet = getattr(aten, name)
    op = getattr(packet, overload)

    def product(*args, **kwargs):
        # (self, mat2, out_dtype) or (self, mat1, mat2, out_dtype); beta, alpha, out by keyword.
        *tensors, out_dtype = args
        if tensors[0].is_cuda:
            return op(*args, **kwargs)
        exact = [t.to(out_dtype) for t in tensors]
        return packet.out(*exact, **kwargs) if "out" in kwargs else packet.default(*exact, **kwargs)
    return Kernel(op, product)


KERNELS = {f"aten::{name}.{overload}": _kernel(name, overload)
           for name in _PRODUCTS for overload in ("dtype", "dtype_out")}
