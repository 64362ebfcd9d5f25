"""Adapters on disk, in PEFT's layout, so they move freely between PEFT and qlora-rt.

    adapter/adapter_config.json        PEFT LoraConfig fields (r, lora_alpha, target_modules, ...)
    adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in)
                                       base_model.model.<module>.lora_B.weight (out, r)

An encoder's adapter also holds its classification head (and pooler), trained in full, as PEFT saves
`modules_to_save`: base_model.model.<module>.<param> (task_type SEQ_CLS).

What PEFT has no field for (the base's 4-bit format, a fingerprint of the base weights, a classifier's
label names) rides in the safetensors header metadata, which PEFT ignores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_rt import __version__
from qlora_rt.base.encoders import HEADS, head_modules, head_tensors, load_head
from qlora_rt.base.formats import QuantConfig
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, write_json
from qlora_rt.lora.layers import LoraConfig, lora_layers, lora_scale

PREFIX = "base_model.model."
CHANGES_BASE = ("pissa", "loftq", "olora", "corda")  # PEFT inits that rewrite the base weights
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterInfo:
    path: Path
    config: dict
    metadata: dict[str, str]
    modules: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # a classifier's label names, in the order of its logits


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names, on the CPU (an encoder's head too)."""
    out = {f"{PREFIX}{name}": t for name, t in head_tensors(model).items()}
    for name, layer in lora_layers(model).items():
        if layer.rank:
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return out


def peft_config(model: torch.nn.Module, cfg: LoraConfig, base: str, init: str = "default") -> dict:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in lora_layers(model).items() if m.rank})
    heads = sorted({n.rpartition(".")[2] for n in head_modules(model)})
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if heads else "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": leaves, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True if init == "default" else init, "modules_to_save": heads or None,
        "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def save_adapter(model: torch.nn.Module, out: str | Path, cfg: LoraConfig, quant_cfg: QuantConfig,
                 base: str, fingerprint: str, residual: Path | None = None, labels: list[str] | None = None) -> Path:
    """Write the adapter folder atomically (a previous one stays intact until the new one is complete).

    residual: a PiSSA/LoftQ run's frozen base (qlora_rt/lora/svd_init.py); it is copied into the folder and
    its digest recorded, because the adapter means nothing on any other base.
    labels: a classifier's label names (metadata `labels`, JSON), in the order of its head's outputs.
    """
    meta = {"format": "pt", "qlora_rt.version": __version__, "base.fingerprint": fingerprint,
            **quant_cfg.as_metadata()}
    if labels:
        meta["labels"] = json.dumps(labels)
    init = "default"
    if residual is not None:
        with safe_open(str(residual), framework="pt") as h:
            saved = h.metadata() or {}
        init = saved["init.method"]
        meta.update({"init": saved["init"], "base.residual": saved["residual.digest"]})
    tensors = adapter_tensors(model)
    meta[DIGEST] = tensors_digest(tensors)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        write_json(tmp / CONFIG, peft_config(model, cfg, base, init))
        if residual is not None:
            shutil.copyfile(residual, tmp / residual.name)
    return Path(out)


DIGEST = "tensors.sha256"  # metadata: the SHA-256 of the adapter's tensors (`tensors_digest`), where qlora-rt wrote it


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_digest(weights: Path, meta: dict[str, str]) -> None:
    """An adapter file qlora-rt wrote holds the tensors it wrote: bytes changed on disk since (a bad disk, a
    partial copy) are refused, naming the file. Files from elsewhere (PEFT) carry no digest: accepted."""
    if DIGEST not in meta:
        return
    st = weights.stat()
    try:
        found = _digest_of(weights, st.st_size, st.st_mtime_ns)
    except Exception:  # safetensors' own errors for a file cut short
        found = None
    if found != meta[DIGEST]:
        raise QloraError(f"{weights}: its tensors changed on disk since they were written (their digest does not "
                         "match); restore the adapter from a copy, or train it again")


@functools.lru_cache(maxsize=8)
def _digest_of(weights: Path, size: int, mtime: int) -> str:
    with safe_open(str(weights), framework="pt") as h:
        return tensors_digest({key: h.get_tensor(key) for key in h.keys()})


def read_adapter(path: str | Path) -> tuple[dict, dict[str, str]]:
    """adapter_config.json and the safetensors metadata, after checking the folder is an adapter."""
    p = Path(path)
    if not p.exists():
        raise QloraError(f"--adapter: {p} does not exist")
    if not p.is_dir():
        raise QloraError(f"--adapter: {p} is a file; expected an adapter folder (with {CONFIG} and {WEIGHTS})")
    if not (p / CONFIG).is_file():
        if (p / "adapter" / CONFIG).is_file():
            raise QloraError(f"--adapter: {p} is a training run's folder; its adapter is {p / 'adapter'}")
        raise QloraError(f"--adapter: {p} has no {CONFIG} (expected a PEFT/qlora-rt adapter folder)")
    if not (p / WEIGHTS).is_file():
        hint = " (adapter_model.bin is not read: it is a pickle; re-save with safetensors)" if (
            p / "adapter_model.bin").exists() else ""
        raise QloraError(f"--adapter: {p} has no {WEIGHTS}{hint}")
    try:
        config = json.loads((p / CONFIG).read_text())
    except ValueError as e:
        raise QloraError(f"{p / CONFIG}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise QloraError(f"{p / CONFIG}: peft_type {config.get('peft_type')!r} is not supported; expected LORA")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise QloraError(f"{p / CONFIG}: {key}={config[key]!r} is not supported; expected {ok!r}")
    saved = config.get("modules_to_save") or []
    known = {leaf for leaves in HEADS.values() for leaf in leaves} | {"score"}
    if not isinstance(saved, list) or set(saved) - known:
        raise QloraError(f"{p / CONFIG}: modules_to_save {saved} is not supported; only a classifier's head "
                         f"({', '.join(sorted(known))})")
    try:
        with safe_open(str(p / WEIGHTS), framework="pt") as h:
            meta = h.metadata() or {}
    except Exception as e:
        raise QloraError(f"{p / WEIGHTS}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
    check_digest(p / WEIGHTS, meta)
    return config, meta


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    for key, value in patterns.items():  # PEFT's rule: the key matches a suffix of the module name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pairs(p: Path, heads: list[str], lora: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                   dict[str, torch.Tensor]]:
    """The LoRA A/B tensors per module (not read with lora=False), and the tensors of the modules saved whole
    (`heads`: their names' last components), by model parameter name (older PEFT wrote them under
    `<module>.modules_to_save.`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    with safe_open(str(p / WEIGHTS), framework="pt") as h:
        for key in h.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if m:
                if lora:
                    pairs.setdefault(m.group(1), {})[m.group(2)] = h.get_tensor(key)
                continue
            name = re.sub(r"\.modules_to_save(\.default)?\.", ".", key.removeprefix(PREFIX))
            if not any(f".{leaf}." in f".{name}" for leaf in heads):
                raise QloraError(f"{p / WEIGHTS}: tensor {key!r} is not a LoRA A/B weight (only Linear LoRA is "
                                 "supported)")
            whole[name] = h.get_tensor(key)
    return pairs, whole


def read_head(path: str | Path) -> dict[str, torch.Tensor]:
    """A classifier adapter's head tensors by model parameter name (empty for a causal-LM adapter)."""
    p = Path(path)
    config, _ = read_adapter(p)
    return _pairs(p, config.get("modules_to_save") or [], lora=False)[1]  # the LoRA tensors are not read


def labels_of(meta: dict[str, str], head: dict[str, torch.Tensor], where: Path) -> list[str] | None:
    """A classifier adapter's label names: its metadata's, or LABEL_0... (PEFT's) from its head's outputs."""
    if not head:
        return None
    if "labels" in meta:
        try:
            labels = json.loads(meta["labels"])
        except ValueError:
            labels = None
        if not isinstance(labels, list) or not labels or not all(isinstance(l, str) for l in labels):
            raise QloraError(f"{where / WEIGHTS}: its label names metadata is damaged ({meta['labels'][:60]!r})")
        return labels
    out = [t for n, t in head.items() if n.endswith(("classifier.weight", "out_proj.weight", "score.weight"))]
    return [f"LABEL_{i}" for i in range(out[-1].shape[0])] if out else None


def read_lora(path: str | Path) -> tuple[dict, dict[str, str], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """config, metadata, and per module (A (r, in), B (out, r), scale), checked for pairing and shape."""
    p = Path(path)
    config, meta = read_adapter(p)
    pairs, _ = _pairs(p, config.get("modules_to_save") or [])
    if not pairs:
        raise QloraError(f"{p / WEIGHTS}: holds no LoRA weights")
    rslora = bool(config.get("use_rslora", False))
    out = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise QloraError(f"{p / WEIGHTS}: {name} has lora_{''.join(pair)} but not its partner")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise QloraError(f"{p / WEIGHTS}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                             "expected A (r, in) and B (out, r)")
        rank = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", A.shape[0]))
        if rank != A.shape[0]:
            raise QloraError(f"{p / CONFIG}: r={rank} for {name}, but its tensors in {WEIGHTS} have rank "
                             f"{A.shape[0]}: the two files do not belong together")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        out[name] = (A, B, lora_scale(alpha, A.shape[0], rslora))
    return config, meta, out


def load_adapter(model: torch.nn.Module, path: str | Path, fingerprint: str | None = None) -> AdapterInfo:
    """Attach the adapter at `path` to a quantized model, checking it fits before touching any layer."""
    p = Path(path)
    config, meta, lora = read_lora(p)
    layers = lora_layers(model)
    for name, (A, B, _) in lora.items():
        layer = layers.get(name)
        if layer is None:
            raise QloraError(f"--adapter {p}: targets {name}, which is not a Linear of this base model "
                             f"(is the adapter for another architecture?)")
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise QloraError(f"--adapter {p}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; the base layer "
                             f"needs A (r, {layer.in_features}) and B ({layer.out_features}, r)")
    stored = meta.get("base.fingerprint")
    if fingerprint and stored and stored != fingerprint:
        raise QloraError(f"--adapter {p}: was trained on a different base model (fingerprint {stored}, "
                         f"this base {fingerprint}); pass the base it was trained on")
    head = read_head(p)
    if head or head_modules(model):
        load_head(model, head, f"--adapter {p}")
    for name, (A, B, scale) in lora.items():
        layer = layers[name]
        layer.attach(A.shape[0], 1.0, float(config.get("lora_dropout", 0.0)))
        layer.scale = scale
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
    return AdapterInfo(path=p, config=config, metadata=meta, modules=sorted(lora), labels=labels_of(meta, head, p))
