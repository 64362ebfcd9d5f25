"""Merge an adapter into its base: W' = dequantize(W4) + s·B·A, in fp32, as a pure function.

The base is rebuilt by quantizing the original checkpoint with the format recorded in the adapter, so
the merged weights are the ones the adapter was trained against, not the unquantized originals. The
result is a plain Hugging Face checkpoint (fp32 safetensors): no silent requantization.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_rt import __version__, quant
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, check_out, write_json
from qlora_rt.lora import LoRALinear

MANIFEST, FORMAT = "qlora_rt_merge.json", "qlora-rt-merged"


def merge_weight(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, name: str) -> torch.Tensor:
    """base (out, in) + scale · B (out, r) @ A (r, in), all in fp32; refuses NaN/inf."""
    merged = base.float() + (B.float() @ A.float()) * scale
    if not torch.isfinite(merged).all():
        raise QloraError(f"{name}: merged weight has NaN/inf (a diverged adapter?); nothing was written")
    return merged


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model with its adapter folded in, fp32, under the base's own keys.

    Reads the model and never changes it; tied weights appear once, as transformers saves them.
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # named_parameters drops the tied duplicate
        owner, _, leaf = name.rpartition(".")
        if owner.endswith((".lora_A", ".lora_B")):
            continue
        layer = modules[owner]
        if isinstance(layer, LoRALinear) and leaf == "weight":
            w = quant.dequantize(layer.weight)
            if layer.rank:
                w = merge_weight(w, layer.lora_A.weight, layer.lora_B.weight, layer.scale, owner)
            out[name] = w.cpu().contiguous()
        else:
            out[name] = p.detach().float().cpu().contiguous()
    return out


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, overwrite: bool = False,
                adapter: str | None = None) -> Path:
    """Write a loadable HF checkpoint folder (config, safetensors shards, tokenizer) atomically, with a
    manifest that marks it as a merge (so that `merge --overwrite` may replace it, and nothing else)."""
    from huggingface_hub import save_torch_state_dict

    state = merged_state_dict(model)
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config_obj = type(model.config).from_dict(config)
    config_obj.dtype = torch.float32
    # a config read from GGUF names no architecture; tools that read config.json (genai's builder) need it
    config_obj.architectures = config_obj.architectures or [type(model).__name__]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size="2GB")
        config_obj.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, {"format": FORMAT, "version": __version__, "adapter": adapter})
    return Path(out)


def merge(model: str, adapter: str, out: str, quant_format: str | None = None, overwrite: bool = False) -> Path:
    """Load base + adapter as trained, fold the adapter in, write an fp32 HF checkpoint to `out`."""
    from qlora_rt.adapters import open_trained

    check_out(out, overwrite, MANIFEST, FORMAT, "merge", reads=(model, adapter))
    loaded, _, _ = open_trained(model, adapter, quant_format)
    return save_merged(loaded.model, loaded.tokenizer, out, overwrite=overwrite, adapter=adapter)
