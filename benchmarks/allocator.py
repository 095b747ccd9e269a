"""CPU memory-allocator setting for inference and benchmarks (no model code depends on it).

PyTorch's CPU tensors come from glibc's malloc. glibc maps every block above its mmap threshold
(128 KiB, raised as mapped blocks are freed, to at most 32 MiB) freshly from the kernel and
unmaps it on free, so each new multi-MB activation pays a page fault per 4 KiB page on first
touch. Measured on the 2-core CI machine (torch 2.13): a GELU writing a fresh 8 MB tensor takes
1.6x, and a fresh 32 MB tensor 4x, as long as one writing into existing memory. At 800x1344
the plain re-implementation of the official dense backbones ran 1.6-1.8x slower than with freed
memory kept, mmeformer up to 1.15x, and one backbone's time in two processes differed by up to
2x, depending on how fragmented the heap happened to be. Caching allocators (jemalloc,
tcmalloc, CUDA's) avoid this by keeping freed memory; :func:`keep_freed_memory` asks glibc to do
the same.
"""
import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_state = {'kept': False}


@functools.lru_cache(maxsize=None)
def _glibc():
    """glibc through ctypes, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    return libc if hasattr(libc, 'mallopt') and hasattr(libc, 'malloc_trim') else None


def keep_freed_memory(mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Make glibc serve blocks below ``mmap_threshold`` from its heap and never trim freed memory
    back to the kernel, for this whole process (the resident size then stays at its peak, as
    with a caching allocator). Returns False, changing nothing, where the C library is not
    glibc. Equivalent environment: ``MALLOC_MMAP_THRESHOLD_=1073741824
    MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=67108864``."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, top_pad)))
    _state['kept'] = _state['kept'] or ok
    return ok


def release_freed_memory() -> bool:
    """Return glibc's free heap memory to the kernel (``malloc_trim(0)``), so that the resident
    size counts live memory only; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def allocator_description() -> str:
    """One line for benchmark reports."""
    if _state['kept']:
        return 'glibc malloc, freed memory kept (benchmarks.allocator.keep_freed_memory)'
    tuned = sorted(k for k in os.environ if k.startswith('MALLOC_') and k.endswith('_'))
    if tuned:
        return 'C library malloc, tuned through ' + ', '.join(tuned)
    return 'C library malloc with its default settings'
