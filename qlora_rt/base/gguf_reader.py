"""Everything read from a GGUF file: its tensor index, parsed once a process, and each tensor's bytes read on
their own; the transformers config and tokenizer its header makes, written once per file to a cache folder; and
each quantized tensor type's blocks as the int4 format's state, exactly as stored (`BLOCK_TYPES`, `as_nbits`,
`stored_linears`).

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
import torch

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


# ---- the header and the float tensors -----------------------------------------------------------------
MAGIC = b"GGUF"
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def architecture_name(path: Path) -> str:
    """`general.architecture` from the GGUF header, reading only the key-values before it.

    gguf.GGUFReader parses the whole vocabulary first (~7 s for a 49k-token model) just to answer this.
    """
    import struct

    def read(n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise QloraError(f"{path}: corrupt GGUF file (truncated header)")
        return b

    def skip_value(kind: int) -> None:
        if kind == 8:  # string: u64 length, bytes
            f.seek(struct.unpack("<Q", read(8))[0], 1)
        elif kind == 9:  # array: u32 element type, u64 count, elements
            elem, count = struct.unpack("<IQ", read(12))
            if elem in _GGUF_SCALAR:
                f.seek(_GGUF_SCALAR[elem] * count, 1)
            else:
                for _ in range(count):
                    skip_value(elem)
        elif kind in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[kind], 1)
        else:
            raise QloraError(f"{path}: corrupt GGUF file (unknown value type {kind})")

    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise QloraError(f"{path}: not a GGUF file (bad magic bytes)")
        version, _, n_kv = struct.unpack("<IQQ", read(20))
        if version < 2:
            raise QloraError(f"{path}: GGUF version {version} is too old; re-convert it with a recent llama.cpp")
        for _ in range(n_kv):
            key = read(struct.unpack("<Q", read(8))[0]).decode("utf-8", "replace")
            kind = struct.unpack("<I", read(4))[0]
            if key == "general.architecture" and kind == 8:
                return read(struct.unpack("<Q", read(8))[0]).decode()
            skip_value(kind)
    raise QloraError(f"{path}: GGUF header has no general.architecture")


class GGUFTensors:
    """A GGUF file's tensors by Hugging Face name, each read on its own (`read`) and
    dequantized exactly as transformers' GGUF loader converts them: its name map and tensor processors
    (llama's q/k rows un-permuted), gguf-py's dequantization; so a lazily built model equals a whole-loaded
    one. transformers itself dequantizes the whole file to fp32 first (an 8B Q4 file: ~32 GB)."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = path
        arch = architecture_name(path)
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        # gguf-py's name map, built once (transformers' get_gguf_hf_weights_map builds one per submodule:
        # ~7 s for SmolLM2), asked for each parameter as transformers asks it
        known = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        tmap = get_tensor_name_map(known, model.config.num_hidden_layers) if known is not None else None
        names = {}  # GGUF name -> HF name; none where gguf-py does not know the architecture (it loads whole)
        for hf_name in model.state_dict() if tmap else ():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = tmap.get_name(base)
            if gguf_name is not None:
                names.setdefault(f"{gguf_name}.{suffix}", hf_name)
        self._where = {names[n]: (n, e) for n, e in index(path).items() if n in names}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from gguf.quants import dequantize

        name, entry = self._where[key]
        raw = read(self.path, name, entry)
        if raw.ndim == 2 and raw.dtype == np.uint8:  # quantized blocks, a row each: dequantized a slice at a time
            # (gguf-py makes fp32 temporaries the size of the whole tensor: a 262k x 640 embedding is 671 MB each)
            rows = max(1, (1 << 22) // max(1, entry.ne[0]))
            weights = np.empty((raw.shape[0], entry.ne[0]), np.float32)
            for r0 in range(0, raw.shape[0], rows):
                weights[r0:r0 + rows] = dequantize(raw[r0:r0 + rows], entry.kind)
        else:
            weights = dequantize(raw, entry.kind)
        weights = self._processor.process(weights=weights, name=name).weights
        t = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        return t if t.dtype == dtype else t.to(dtype)


# ---- quantized tensors as MatMulNBits' state, never rounded ----------------------------------------------
# Each GGUF block type as (weights a scale covers, MatMulNBits bits, unpacker). An unpacker takes a tensor's
# blocks, (rows, blocks a row, bytes a block), and returns its codes in element order (rows, k_blocks, block),
# one fp32 scale per k-block, integer zero points (uint8; None: the symmetric mid, 2**(bits-1)) and, where a type
# has them, float minimums (w = q * scale + min; the product then subtracts the zero points and adds them back in
# its correction, qlora_rt/base/packed_int4.py). Scales and minimums are computed as gguf-py computes them
# (fp16 -> fp32, then one product where a k-quant's 6- or 8-bit sub-scale applies), so `packed_int4.dequantize`
# of the result equals gguf-py's `dequantize` of the file bit for bit (tests/test_gguf_types.py). 5- and 6-bit
# codes take a byte each (bits=8): MatMulNBits has no 5- or 6-bit kernel.

def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) fp32, as gguf-py reads a block's fp16 scale."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: element j is byte j's low nibble, element j + 16 its high nibble."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32) bits (Q5_0/Q5_1: each element's fifth bit)."""
    u = np.ascontiguousarray(qh).view("<u4")
    return ((u >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit sub-block scales and eight 6-bit minimums."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_0(b):
    return _nibbles(b[..., 2:]), _f16(b[..., 0:2]), None, None


def _q4_1(b):
    return _nibbles(b[..., 4:]), _f16(b[..., 0:2]), None, _f16(b[..., 2:4])


def _q5_0(b):
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << 4), d, np.full(d.shape, 16, np.uint8), None


def _q5_1(b):  # zero points 0 (not the mid, 128): the kernel's terms stay the size of the weights
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << 4), d, np.zeros(d.shape, np.uint8), _f16(b[..., 2:4])


def _q8_0(b):  # int8 codes moved up by 128 (the symmetric mid): the same weights
    return (np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8), \
        _f16(b[..., 0:2]), None, None


def _k_sub(b: np.ndarray, codes: np.ndarray, zero: bool):
    """Q4_K/Q5_K: a super-block's eight sub-blocks of 32, scale d·sc and minimum -(dmin·m) each (zero: zero points 0,
    as Q5_1)."""
    rows, n = b.shape[:2]
    sc, mn = _k_scale_min(b[..., 4:16])
    scales = _f16(b[..., 0:2])[..., None] * sc.astype(np.float32)
    mins = -(_f16(b[..., 2:4])[..., None] * mn.astype(np.float32))  # q·scale + (-dm) is q·scale - dm exactly
    zeros = np.zeros((rows, n * 8), np.uint8) if zero else None
    return codes.reshape(rows, n * 8, 32), scales.reshape(rows, -1), zeros, mins.reshape(rows, -1)


def _low_nibbles_k(qs: np.ndarray) -> np.ndarray:
    """(rows, n, 128) -> (rows, n, 8, 32): each 32 bytes hold two sub-blocks, low nibbles first."""
    q = qs.reshape(*qs.shape[:2], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    return (q & 0xF).reshape(*qs.shape[:2], 8, 32)


def _q4_k(b):
    return _k_sub(b, _low_nibbles_k(b[..., 16:144]), zero=False)


def _q5_k(b):
    qh = b[..., 16:48].reshape(*b.shape[:2], 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    return _k_sub(b, _low_nibbles_k(b[..., 48:176]) | ((qh & 1) << 4), zero=True)


def _q6_k(b):
    rows, n = b.shape[:2]
    ql = b[..., 0:128].reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    qh = b[..., 128:192].reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = ((ql & 0xF).reshape(rows, n, 8, 32) | ((qh & 3).reshape(rows, n, 8, 32) << 4)).reshape(rows, n * 16, 16)
    scales = _f16(b[..., 208:210])[..., None] * np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    return codes, scales.reshape(rows, -1), np.full((rows, n * 16), 32, np.uint8), None


# type name -> (weights a scale covers, MatMulNBits bits, bytes a GGUF block, unpacker)
BLOCK_TYPES = {"Q4_0": (32, 4, 18, _q4_0), "Q4_1": (32, 4, 20, _q4_1), "Q5_0": (32, 8, 22, _q5_0),
               "Q5_1": (32, 8, 24, _q5_1), "Q8_0": (32, 8, 34, _q8_0), "Q4_K": (32, 4, 144, _q4_k),
               "Q5_K": (32, 8, 176, _q5_k), "Q6_K": (16, 8, 210, _q6_k)}
FLOAT_TYPES = ("F32", "F16", "BF16")


def as_nbits(raw: np.ndarray, kind: str, K: int, compute: str = "fp32"):
    """One tensor's raw blocks (rows, bytes a row) of GGUF type `kind` -> (packed, Int4) in the project's int4
    format (qlora_rt/base/packed_int4.py): the file's codes and scales, reordered but never rounded."""
    from qlora_rt.base.packed_int4 import Int4, pack

    block, bits, nbytes, unpack = BLOCK_TYPES[kind]
    rows = raw.shape[0]
    codes, scales, zeros, mins = unpack(np.ascontiguousarray(raw).reshape(rows, -1, nbytes))
    codes = torch.from_numpy(np.ascontiguousarray(codes, np.uint8))
    state = Int4(torch.from_numpy(np.ascontiguousarray(scales, np.float32)),
                 None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros)),
                 None if mins is None else torch.from_numpy(np.ascontiguousarray(mins, np.float32)),
                 K, block, compute, f"gguf-{kind.lower()}", bits)
    return (pack(codes) if bits == 4 else codes), state


def unpermute_rows(n_rows: int, heads: int):
    """llama.cpp stores q/k rows interleaved for its RoPE; the index that puts them back in HF order."""
    src = torch.arange(n_rows).view(heads, 2, n_rows // heads // 2).transpose(1, 2).reshape(-1)
    return torch.argsort(src)


def _take_rows(packed, s, idx):
    from dataclasses import replace

    return packed[idx].contiguous(), replace(s, scales=s.scales[idx], zeros=None if s.zeros is None else s.zeros[idx],
                                             mins=None if s.mins is None else s.mins[idx])


# the decoder Linears by their GGUF name inside a block (blk.N.<name>.weight)
GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
HEADS = ("output.weight", "token_embd.weight")  # the head: its own tensor, else the tied embedding


def stored_linears(path, config, kinds=tuple(BLOCK_TYPES), compute: str = "fp32", head: bool = False):
    """The decoder Linears (and, with head=True, the output head as "lm_head") a GGUF file stores in one of
    `kinds`, by Hugging Face module name, as (packed, Int4) exactly as stored; and the names of the others
    (other types: float, or a block type not taken), which the caller quantizes from their float weights."""
    from qlora_rt.architectures import architecture

    out, other = {}, []
    permute = architecture(config.model_type).gguf_qk_permuted
    entries = index(path)
    wanted = {}
    for gname in entries:
        parts = gname.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LINEARS and parts[3] == "weight":
            wanted[gname] = (f"model.layers.{parts[1]}.{GGUF_LINEARS[parts[2]]}", parts[2])
    if head:
        gname = next((h for h in HEADS if h in entries), None)
        if gname is not None:
            wanted[gname] = ("lm_head", None)
    for gname, (name, role) in wanted.items():
        entry = entries[gname]
        kind = entry.kind.name
        if kind not in kinds or entry.ne[0] % BLOCK_TYPES[kind][0]:
            other.append(name)
            continue
        packed, s = as_nbits(read(Path(path), gname, entry), kind, entry.ne[0], compute)
        if permute and role in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
            packed, s = _take_rows(packed, s, unpermute_rows(packed.shape[0], heads))
        out[name] = (packed, s)
    return out, other
