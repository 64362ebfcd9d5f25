"""The decoder's KV cache, shared by `Model` (runtime/decoder.py) and the serving engine (runtime/batching.py).

One zeroed (rows, kv_heads, capacity, head_dim) fp32 buffer per past tensor, bound by I/O binding as both
`past_key_values.N.*` and `present.N.*`: GroupQueryAttention appends each step's keys and values in place,
so nothing is copied between steps. A run binds all rows, or a window of them (the engine's slots
first .. first+n-1: a view of the same memory, made once per window).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.manifest import Manifest


class KVCache:
    def __init__(self, meta: Manifest, rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        self.names = io.past_names(meta.layers)
        # the numpy arrays behind the bound values: they must outlive every binding of them
        self.buffers = {n: np.zeros((rows, meta.kv_heads, capacity, meta.head_dim), np.float32) for n in self.names}
        self._windows: dict[tuple[int, int], list[ort.OrtValue]] = {}

    def bind(self, binding: ort.IOBinding, first: int = 0, rows: int | None = None) -> None:
        """Bind rows first .. first+rows-1 (all by default) as the run's past and present."""
        key = (first, self.rows - first if rows is None else rows)
        if key not in self._windows:
            self._windows[key] = [ort.OrtValue.ortvalue_from_numpy(self.buffers[n][first:first + key[1]])
                                  for n in self.names]
        for name, value in zip(self.names, self._windows[key]):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(io.present_of(name), value)
