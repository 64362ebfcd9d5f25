"""Memory the C library holds after large tensors are freed."""

from __future__ import annotations

import functools


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps the transient fp32 weights' pages in its heap
    (they are below its adaptive mmap threshold), which at the Llama-3.2-1B shape adds ~0.5 GB to the
    peak of a lazy load; malloc_trim returns them. A no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, looked up once (it is called every training step), or None."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
