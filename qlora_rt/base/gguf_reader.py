"""A GGUF file's tensor index, parsed once a process, and each tensor's bytes read on their own.

gguf-py's GGUFReader memory-maps the whole file and parses its whole header (the vocabulary too: ~3-7 s
for SmolLM2's); reading tensors through that mapping leaves every page read resident for as long as
the mapping lives. Here the header is parsed once per file (the index is kept, the mapping dropped) and
tensors are read with plain file reads, one at a time, by the loader and the int4 import alike.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_rt.errors import QloraError


@dataclass(frozen=True)
class Entry:
    kind: object              # gguf.GGMLQuantizationType
    offset: int               # of the data, from the start of the file
    dtype: np.dtype           # the stored data as numpy reads it (quantized types: uint8 bytes)
    shape: tuple[int, ...]    # ... and its numpy shape (quantized types: rows x bytes a row)
    ne: tuple[int, ...]       # GGUF's own dimensions (innermost first)


def index(path: str | Path) -> dict[str, Entry]:
    """GGUF tensor name -> where and how it is stored."""
    path = Path(path)
    st = path.stat()
    return _index(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _index(path: Path, size: int, mtime: int) -> dict[str, Entry]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        out = {t.name: Entry(t.tensor_type, int(t.data_offset), t.data.dtype, tuple(t.data.shape),
                             tuple(int(n) for n in t.shape)) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:  # gguf-py's parse of a bad header
        why = "truncated" if size < 1 << 20 or "reshape" in str(e) or "buffer" in str(e) else "not a GGUF file"
        raise QloraError(f"{path}: {why} ({str(e).splitlines()[0][:100]}); download the file again") from None
    del reader  # the mapping goes with it; no tensor page was read
    end = max((e.offset + int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize for e in out.values()), default=0)
    if end > size:
        raise QloraError(f"{path}: truncated ({size:,} bytes; its tensors run to {end:,}); download the file again")
    return out


def read(path: Path, name: str, entry: Entry) -> np.ndarray:
    """One tensor's stored data (not dequantized), with plain file reads."""
    count = int(np.prod(entry.shape))
    raw = np.fromfile(path, dtype=entry.dtype, count=count, offset=entry.offset)
    if raw.size != count:
        raise QloraError(f"{path}: truncated ({name} runs past the end of the file)")
    return raw.reshape(entry.shape)
