"""A CPU worker keeps its freed host memory for the next tensors, as a GPU's caching allocator
keeps freed device memory.

A worker without a GPU computes in host memory, which torch's CPU allocator takes from glibc's
malloc. malloc hands a freed block past its thresholds back to the kernel (128 KiB at first,
raised as such blocks come back), so the next tensor of that size is mapped anew and faults in
page by page at first touch. A worker's results stay alive until the front frees them, a batch
later, and malloc's thresholds never settle on that pattern: on the Llama reference model's step
the worker took about 1,700 page faults per step in its ``mul`` ops alone, and its op calls took
16.5 ms a step instead of 11.8 (docs/PERFORMANCE.md). A CUDA device never pays this, its caching
allocator reuses freed blocks; so a CPU worker has malloc keep them too. The process then holds
the most host memory its tensors ever used, as a GPU process holds its reserved memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit): blocks up to this come
# from the heap, larger ones (whose compute outweighs their faults) are still mapped.
MMAP_THRESHOLD = 32 << 20
# The largest value mallopt takes (an int): the heap's free top is never handed back.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Tell malloc to keep freed blocks; False where the C library has no ``mallopt`` (not glibc),
    which leaves its own policy in place."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: host memory is allocated under its own policy")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
