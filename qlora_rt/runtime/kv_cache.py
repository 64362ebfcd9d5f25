"""The decoder's KV cache, shared by `Model` (runtime/decoder.py) and the serving engine (runtime/batching.py).

One zeroed (rows, kv_heads, capacity, head_dim) buffer per past tensor, of the export's cache type (fp32, or
fp16: `export --kv-cache`), bound by I/O binding as both
`past_key_values.N.*` and `present.N.*`: GroupQueryAttention appends each step's keys and values in place,
so nothing is copied between steps. A run binds all rows, or a window of them (the engine's slots
first .. first+n-1: a view of the same memory, made once per window).

Memory follows use, not capacity: the buffers are anonymous pages the kernel zero-fills when first
written, in 4 KiB pages (16 positions of a 64-wide fp32 head), never huge ones. numpy asks for 2 MiB pages
on arrays this large (madvise MADV_HUGEPAGE), and one key written into a row of a 2,048-position cache then
made its whole 2 MiB resident: a server's 16 x 2,048 cache was all resident after a few short requests.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.manifest import Manifest


class KVCache:
    def __init__(self, meta: Manifest, rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        self.names = io.past_names(meta.layers)
        shape = (rows, meta.kv_heads, capacity, meta.head_dim)
        # the arrays behind the bound values: they (and their pages) must outlive every binding of them
        dtype = np.dtype(meta.kv_cache_dtype or "float32")
        self.buffers = {n: _zeros(shape, dtype) for n in self.names}
        self._windows: dict[tuple[int, int], list[ort.OrtValue]] = {}

    @property
    def nbytes(self) -> int:
        """The whole cache's size at capacity (what it holds resident is what its rows have written)."""
        return sum(b.nbytes for b in self.buffers.values())

    def bind(self, binding: ort.IOBinding, first: int = 0, rows: int | None = None) -> None:
        """Bind rows first .. first+rows-1 (all by default) as the run's past and present."""
        key = (first, self.rows - first if rows is None else rows)
        if key not in self._windows:
            self._windows[key] = [ort.OrtValue.ortvalue_from_numpy(self.buffers[n][first:first + key[1]])
                                  for n in self.names]
        for name, value in zip(self.names, self._windows[key]):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(io.present_of(name), value)


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zeroed array on its own anonymous mapping, in small pages (the array keeps the mapping alive)."""
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return np.zeros(shape, dtype)
    pages = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where the kernel gives huge pages to every mapping (THP "always")
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype).reshape(shape)
