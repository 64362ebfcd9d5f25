"""A GGUF file's tensor index, parsed once a process, and each tensor's bytes read on their own; and the
transformers config and tokenizer its header makes, written once per file to a cache folder.

gguf-py's GGUFReader memory-maps the whole file and parses its whole header (the vocabulary too: ~3-7 s
for SmolLM2's, ~13 s for Gemma 3's 262k tokens); reading tensors through that mapping leaves every page read
resident for as long as the mapping lives. Here the header is parsed once per file (the index is kept, the
mapping dropped) and tensors are read with plain file reads, one at a time, by the loader and the int4 import
alike. transformers parses the whole header again for the config and again for the tokenizer (~15 s each for
Gemma 3): `metadata_folder` keeps what they make as ordinary Hugging Face files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
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
    from gguf import GGMLQuantizationType, GGUFReader

    saved = cache_root() / "gguf" / f"{_key(path, size, mtime)}.tensors.json"
    try:  # parsed by an earlier process: the entries as they were written (a damaged file is parsed again)
        return {name: Entry(GGMLQuantizationType(kind), offset, np.dtype(dtype), tuple(shape), tuple(ne))
                for name, kind, offset, dtype, shape, ne in json.loads(saved.read_text())}
    except (OSError, ValueError, TypeError):
        pass
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
    rows = [[n, int(e.kind), e.offset, e.dtype.str, e.shape, e.ne] for n, e in out.items()]
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(f".{saved.name}.{os.getpid()}")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, saved)
    except OSError:  # no cache (a read-only home): parsed again next time
        pass
    return out


def read(path: Path, name: str, entry: Entry) -> np.ndarray:
    """One tensor's stored data (not dequantized), with plain file reads."""
    count = int(np.prod(entry.shape))
    raw = np.fromfile(path, dtype=entry.dtype, count=count, offset=entry.offset)
    if raw.size != count:
        raise QloraError(f"{path}: truncated ({name} runs past the end of the file)")
    return raw.reshape(entry.shape)


CACHE_ENV = "QLORA_RT_CACHE"  # where metadata folders go (default ~/.cache/qlora-rt)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora-rt")


def _key(path: Path, size: int, mtime: int) -> str:
    """A GGUF file's name in the cache: a changed file (size or modification time) is another file."""
    return hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()[:20]


def metadata_folder(path: Path) -> Path | None:
    """A folder with the config.json and tokenizer files that transformers makes from a GGUF's header, made
    once per file (keyed by its path, size and modification time, so a changed file gets a new one). None where
    no cache folder can be written (a read-only home): the caller then reads the GGUF itself. Two processes
    making it at once (the ranks of a distributed run) each write their own and the first rename wins: the
    two are the same."""
    st = path.stat()
    key = _key(path.resolve(), st.st_size, st.st_mtime_ns)
    final = cache_root() / "gguf" / key
    if (final / "config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    except OSError:
        return None
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{path.resolve()}\n")
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return final if (final / "config.json").is_file() else None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
