"""Merge an adapter into its base: W' = dequantize(W4) + s·B·A, in fp32, as a pure function.

The base is rebuilt by quantizing the original checkpoint with the format recorded in the adapter, so
the merged weights are the ones the adapter was trained against, not the unquantized originals. The
result is a plain Hugging Face checkpoint (fp32 safetensors): no silent requantization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from qlora_rt import __version__
from qlora_rt.base import formats
from qlora_rt.base.memory import release_freed_memory
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, check_out, write_json
from qlora_rt.lora.layers import QuantLinear

MANIFEST, FORMAT = "qlora_rt_merge.json", "qlora-rt-merged"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # what tokenizer_config.json names (save_tokenizer)


def merge_weight(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, name: str) -> torch.Tensor:
    """base (out, in) + scale · B (out, r) @ A (r, in), all in fp32; refuses NaN/inf."""
    merged = base.float() + (B.float() @ A.float()) * scale
    if not torch.isfinite(merged).all():
        raise QloraError(f"{name}: merged weight has NaN/inf (a diverged adapter?); nothing was written")
    return merged


def merged_weights(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """Every weight of the model under the base's own keys: its shape, and a function that computes it with
    its adapter folded in, fp32, when called (so a writer can hold one tensor at a time).

    Reads the model and never changes it; tied weights appear once, as transformers saves them.
    """
    modules = dict(model.named_modules())
    out: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    for name, p in model.named_parameters():  # named_parameters drops the tied duplicate
        owner, _, leaf = name.rpartition(".")
        if owner.endswith((".lora_A", ".lora_B")):
            continue
        layer = modules[owner]
        if isinstance(layer, QuantLinear) and leaf == "weight":  # a LoRA layer, or a quantized head
            out[name] = ((layer.out_features, layer.in_features), partial(_merged_linear, layer, owner))
        else:
            out[name] = (tuple(p.shape), lambda p=p: p.detach().float().cpu().contiguous())
    return out


def _merged_linear(layer: QuantLinear, name: str) -> torch.Tensor:
    w = formats.dequantize(layer.weight)
    if layer.rank:
        w = merge_weight(w, layer.lora_A.weight, layer.lora_B.weight, layer.scale, name)
    return w.cpu().contiguous()


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All of `merged_weights` computed at once (small models, tests)."""
    return {name: make() for name, (_, make) in merged_weights(model).items()}


def write_shards(weights: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]], folder: Path,
                 max_shard_bytes: int = 2**30) -> None:
    """An fp32 safetensors checkpoint in transformers' sharded layout, each tensor computed and written in
    turn: peak memory is one tensor, not the model (a merged 8B model is 32 GB in fp32)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in weights.items():
        if shards[-1] and size + 4 * math.prod(shape) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 4 * math.prod(shape)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for names, file in zip(shards, files):
        write_safetensors(folder / file, {name: weights[name] for name in names})
    if len(shards) > 1:
        write_json(folder / "model.safetensors.index.json", {
            "metadata": {"total_size": 4 * sum(math.prod(shape) for shape, _ in weights.values())},
            "weight_map": {name: file for names, file in zip(shards, files) for name in names}})


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]) -> None:
    """One fp32 safetensors file, written a tensor at a time as each is computed. safetensors' own save_file
    serializes the whole file in memory first (a 1 GB shard then costs 2 GB beside its tensors). The
    layout is the published one: 8-byte little-endian header length, a JSON header of dtype, shape and
    data offsets (padded with spaces to 8 bytes), then the data in header order; safetensors reads it back
    (tests/test_merge.py)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, (shape, _) in tensors.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, (shape, make) in tensors.items():
            t = make()
            if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
                raise QloraError(f"{name}: computed {t.dtype} {tuple(t.shape)}, expected float32 {tuple(shape)}")
            f.write(memoryview(t.detach().contiguous().numpy()).cast("B"))
            del t
            release_freed_memory()


def hf_config(model: torch.nn.Module):
    """The model's Hugging Face config as a folder of its fp32 weights holds it (merge's checkpoint, an ONNX
    export's config.json): no quantization config, and the class the weights are for (a config read from
    GGUF names none, and a classifier merged from a base encoder's checkpoint (BertModel) now holds its
    head: tools that read config.json need the right one)."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config_obj = type(model.config).from_dict(config)
    config_obj.dtype = torch.float32
    config_obj.architectures = [type(model).__name__]
    return config_obj


def save_tokenizer(tokenizer, folder: Path, input_names: list[str] | None = None) -> None:
    """The tokenizer's files, naming a class that transformers 4.x and 5.x (and transformers.js) all load:
    5.x writes `TokenizersBackend`, which 4.x does not know; the tokenizer itself is tokenizer.json. The
    generic class returns token_type_ids unless told otherwise, which a decoder's `generate` refuses: the
    inputs it returns are `input_names` (default: the tokenizer's own)."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if path.exists():
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in (None, "TokenizersBackend"):
            config["tokenizer_class"] = TOKENIZER_CLASS
        config["model_input_names"] = list(input_names or tokenizer.model_input_names)
        write_json(path, config)


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, overwrite: bool = False,
                adapter: str | None = None) -> Path:
    """Write a loadable HF checkpoint folder (config, safetensors shards, tokenizer) atomically, with a
    manifest that marks it as a merge (so that `merge --overwrite` may replace it, and nothing else)."""
    weights = merged_weights(model)
    config_obj = hf_config(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_shards(weights, tmp)
        config_obj.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / MANIFEST, {"format": FORMAT, "version": __version__, "adapter": adapter})
    return Path(out)


def merge(model: str, adapter: str, out: str, quant_format: str | None = None, overwrite: bool = False) -> Path:
    """Load base + adapter as trained, fold the adapter in, write an fp32 HF checkpoint to `out`."""
    from qlora_rt.trained import open_trained

    check_out(out, overwrite, MANIFEST, FORMAT, "merge", reads=(model, adapter))
    loaded, _, _ = open_trained(model, adapter, quant_format)
    return save_merged(loaded.model, loaded.tokenizer, out, overwrite=overwrite, adapter=adapter)
