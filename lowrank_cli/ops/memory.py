"""The native libraries' own memory, kept to what one block needs: a process-wide choice, the caller's.

Nothing in the library calls bound_native_memory: it changes the whole process (an environment
variable oneDNN reads, glibc's malloc), so the `lowrank` CLI applies it for the commands that run
a model block by block (evaluate, compress --fidelity), and a Python program may call it itself.
Torch-free, so that it can run before torch loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# oneDNN keeps a primitive per matmul shape (1,024 by default); a compressed model's ranks differ per
# matrix and its batches per length, so on CPU that cache alone held ~400 MB over SmolLM2's 30 blocks.
ONEDNN_CACHE = "8"
MMAP_THRESHOLD = 1 << 17  # glibc: allocations from 128 KiB on are mapped, and unmapped when freed
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def bound_native_memory() -> None:
    """Keep oneDNN's and glibc's own memory to what a block needs (measured on SmolLM2, docs/evaluate.md).

    Freed activations of one block's size otherwise stay in glibc's heap (its mmap threshold rises
    after each large free), and oneDNN caches a primitive for every shape it meets. Both settings
    are process-wide, so only the caller decides: call it before torch's first matmul. A user's own
    ONEDNN_PRIMITIVE_CACHE_CAPACITY or MALLOC_MMAP_THRESHOLD_ is kept; off glibc nothing is done.

    Example:
        >>> lowrank_cli.bound_native_memory()  # first, then evaluate a large model block by block
        >>> lowrank_cli.evaluate("hf-model/", "hf-model.lowrank/", text="held-out.txt")
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)  # read at oneDNN's first matmul
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
