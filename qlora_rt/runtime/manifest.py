"""An export's manifest, `qlora_rt_export.json`: what a runtime needs to drive the graph, typed and checked.

Written by `qlora-rt export`, read by the runtime and by `export-adapter`. Torch-free. Every problem with
a folder or its manifest is one line naming the file and what was expected, never a KeyError.

    family  decoder (task causal-lm: generate, chat) | encoder (task classify)
    mode    merged | adapter-aware; the LoRA inputs (`lora_inputs`, `lora_groups`) of adapter-aware graphs
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from qlora_rt.errors import QloraError
from qlora_rt.families import FAMILIES

NAME, FORMAT = "qlora_rt_export.json", "qlora-rt-onnx"
# the oldest onnxruntime that runs the graphs export writes (GroupQueryAttention's attention_bias input; tested
# in tests/test_runtime_install.py); pyproject.toml requires it too
MIN_ONNXRUNTIME = "1.22.0"
# an export that reads its embedding as stored (GatherBlockQuantized with 8-bit blocks, its `bits` attribute):
# onnxruntime 1.22.0 refuses the attribute, 1.23.2 runs it (checked 2026-12-07)
MIN_ONNXRUNTIME_8BIT_GATHER = "1.23.2"
KV_CACHE = "in-place"  # decoders: the graph appends to a bound max-length cache; older ones concatenated
TASKS = {f.name: (f.task,) for f in FAMILIES.values()}
# What each family's runtime cannot do without (beyond the common fields without a default).
REQUIRED = {f.name: f.manifest_fields for f in FAMILIES.values()}


@dataclass
class Manifest:
    format: str
    mode: str
    layers: int
    base_fingerprint: str
    base_quant: str
    lora_inputs: dict[str, list]       # adapter-aware: each LoRA/head input's fixed dims ([in, None] / [None, out])
    family: str = "decoder"            # exports before the encoder family were all decoders
    task: str = "causal-lm"
    version: str = "?"
    weights: str = "?"
    model_type: str = "?"
    hidden: int = 0
    heads: int = 0
    base_model: str = "?"
    base_residual: str | None = None   # PiSSA/LoftQ: the digest of the residual base the adapter belongs to
    pad_token_id: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    lora_groups: dict[str, list] = field(default_factory=dict)  # a fused pair's member Linears: [[name, out], ...]
    external_data: dict[str, int] = field(default_factory=dict)  # files beside model.onnx and their sizes
    # decoder
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    max_context: int | None = None
    eos_token_ids: list[int] | None = None
    kv_cache: str | None = None
    int4_activations: str | None = None  # the 4-bit products' activations: fp32 (exact) or int8 (fast batched)
    min_onnxruntime: str | None = None  # the oldest onnxruntime that runs the graph
    chat_template: bool | None = None   # whether the folder holds one (a base model's file may have none)
    long_rope_from: int | None = None   # LongRoPE: a run whose total length passes it takes the long tables
    kv_cache_dtype: str | None = None   # the past/present tensors' type: float32 (also when absent) or float16
    # encoder
    max_length: int | None = None       # longest input in tokens (position table); longer texts are truncated
    token_type_ids: bool | None = None  # whether the graph takes them (BERT does; RoBERTa, DistilBERT do not)
    labels: list[str] | None = None     # merged: the trained label names; adapter-aware: each adapter brings its own

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _matches(value: object, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, args[1]) for k, v in value.items())
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse(raw: object, where: str) -> Manifest:
    """A manifest from its JSON value, checked field by field (type, family, task, what the family needs)."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise QloraError(f"{where} is not a qlora-rt export description")
    hints = typing.get_type_hints(Manifest)
    known = {f.name: f for f in fields(Manifest)}
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    family = raw.get("family", "decoder")
    if family not in TASKS:
        raise QloraError(f"{where}: family {family!r} is not one this runtime knows ({', '.join(TASKS)}); "
                         "a newer qlora-rt wrote it")
    if family == "decoder" and raw.get("kv_cache") != KV_CACHE:
        raise QloraError(f"{Path(where).parent} was exported by an older qlora-rt ({raw.get('version', '?')}), whose "
                         "graph this runtime cannot drive; export it again with `qlora-rt export`")
    missing = [k for k in required + list(REQUIRED[family]) if raw.get(k) is None]
    if missing:
        raise QloraError(f"{where} is not a qlora-rt export description (missing {', '.join(missing)})")
    for key, value in raw.items():
        if key in known and not _matches(value, hints[key]):
            raise QloraError(f"{where}: {key} is {json.dumps(value)[:60]}; expected {_describe(hints[key])}")
    m = Manifest(**{k: v for k, v in raw.items() if k in known})
    if m.task not in TASKS[family]:
        raise QloraError(f"{where}: task {m.task!r} is not a {family} task ({', '.join(TASKS[family])})")
    if m.mode not in ("merged", "adapter-aware"):
        raise QloraError(f"{where}: mode {m.mode!r}; expected merged or adapter-aware")
    _check_values(m, where)
    return m


def _check_values(m: Manifest, where: str) -> None:
    """Values of the right type that no export writes (a hand-edited or damaged file): one line, not a
    traceback from the graph."""
    at_least_1 = ["layers"] + (["kv_heads", "head_dim", "vocab", "max_context"] if m.family == "decoder"
                               else ["max_length"])
    for key in at_least_1:
        if getattr(m, key) is not None and getattr(m, key) < 1:
            raise QloraError(f"{where}: {key} is {getattr(m, key)}; it must be at least 1 (a damaged file: export "
                             "the model again)")
    if m.family == "decoder":
        if m.head_dim % 2:
            raise QloraError(f"{where}: head_dim is {m.head_dim}; rotary attention needs an even one (a damaged file)")
        if not m.eos_token_ids or not all(0 <= t < m.vocab for t in m.eos_token_ids):
            raise QloraError(f"{where}: eos_token_ids {m.eos_token_ids} are not token ids of its vocabulary of "
                             f"{m.vocab} (a damaged file)")
        if m.pad_token_id is not None and not 0 <= m.pad_token_id < m.vocab:
            raise QloraError(f"{where}: pad_token_id {m.pad_token_id} is not a token id of its vocabulary of "
                             f"{m.vocab} (a damaged file)")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _version(text: str) -> tuple[int, ...]:
    """1.22.0 -> (1, 22, 0); a local or pre-release tail (1.23.0.dev20250101, 1.22.0+cpu) is ignored."""
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts)


def _describe(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def read(folder: Path) -> Manifest:
    """The export folder's manifest, after checking the folder holds what it names."""
    if not folder.is_dir():
        raise QloraError(f"{folder} is not a folder (expected an export made by `qlora-rt export`)")
    if not (folder / "model.onnx").is_file():
        raise QloraError(f"{folder} has no model.onnx; is it the folder `qlora-rt export --out` wrote?")
    path = folder / NAME
    if not path.is_file():
        raise QloraError(f"{folder} has no {NAME}; it was not made by `qlora-rt export`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QloraError(f"{path} is not valid JSON ({e})") from None
    m = parse(raw, str(path))
    if m.min_onnxruntime and _version(ort_version()) < _version(m.min_onnxruntime):
        raise QloraError(f"{folder} needs onnxruntime >= {m.min_onnxruntime}; this is {ort_version()}: "
                         f"pip install -U 'onnxruntime>={m.min_onnxruntime}'")
    for name, size in m.external_data.items():  # the weights beside model.onnx
        data = folder / name
        if not data.is_file():
            raise QloraError(f"{folder} has no {name} (the model's weights, {size:,} bytes); copy the whole folder")
        if data.stat().st_size != size:
            raise QloraError(f"{data} is {data.stat().st_size:,} bytes; the export wrote {size:,}: it was cut short "
                             "or replaced; copy the whole folder again")
    return m


def expect(m: Manifest, family: str, folder: Path, verb: str) -> None:
    """A verb for one family given another family's export: say which verb serves it."""
    if m.family != family:
        other = "`qlora-rt generate` or `qlora-rt chat`" if m.family == "decoder" else "`qlora-rt classify`"
        article = "an" if m.family[0] in "aeiou" else "a"
        raise QloraError(f"{folder} is {article} {m.family} ({m.task}) export; `qlora-rt {verb}` runs {family}s: "
                         f"use {other}")
