"""Host memory: keep the resident set near what the live tensors need.

PyTorch's CPU allocator calls ``malloc``. glibc serves blocks above its *mmap threshold* from
their own memory maps (returned to the system on ``free``) and smaller ones from the heap, and it
raises that threshold dynamically, up to 32 MiB, each time a mapped block is freed. A training step
allocates and frees hundreds of activation and gradient tensors of 1-32 MiB; after the first step
they all land on the heap, where freed blocks in the middle cannot be returned, so the peak resident
set creeps up step by step (by ~200 MB at hidden 768 in ``benchmarks/bench_dpo.py``). Fixing the
threshold at 1 MiB keeps every such tensor in its own map: the resident set follows the live
tensors. The price is a page fault per fresh page, which measured within the noise on CPU training
steps (the matmuls dominate).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` (this disables its dynamic growth).
    Process-wide; a no-op returning False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
