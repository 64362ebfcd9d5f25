"""The encoder family: BERT-style models with a sequence-classification head (transformers' own classes).

Every encoder Linear is quantized and can carry LoRA, like a decoder's. The classification head, and the
pooler where the family's head reads it, are new or task-specific weights: they are trained in full, in
fp32, and saved with the adapter (PEFT's `modules_to_save`), so an adapter is a whole task: its LoRA,
its head and its label names, on a shared 4-bit base.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_rt.errors import QloraError
from qlora_rt.families import ENCODER

ENCODERS = ENCODER.model_types
# Module names (last component) trained in full: what PEFT's modules_to_save names for the family.
HEADS = {"bert": ("pooler", "classifier"), "roberta": ("classifier",), "xlm-roberta": ("classifier",),
         "distilbert": ("pre_classifier", "classifier"), "modernbert": ("head", "classifier")}


def takes_token_types(model_type: str) -> bool:
    """BERT (and MiniLM) read token_type_ids (segment A / B of a pair); RoBERTa's single type and DistilBERT's
    absent embedding do not."""
    return model_type == "bert"


def max_tokens(config) -> int:
    """The longest input the position table holds. RoBERTa/XLM-R number positions from padding_idx + 1, so
    position padding_idx + T must still be in the table."""
    if config.model_type in ("roberta", "xlm-roberta"):
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def head_modules(model: nn.Module) -> list[str]:
    """The full names of the modules trained in full (empty for a model without a classification head)."""
    if not is_classifier(model):
        return []
    leaves = HEADS.get(model.config.model_type, ("classifier",))
    return [name for name, _ in model.named_modules() if name.rpartition(".")[2] in leaves]


def _to_fp32(module: nn.Module, args: tuple) -> tuple:
    # the head is fp32 even when the base computes in bf16 (as LoRA's A and B are)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def train_head(model: nn.Module) -> list[str]:
    """Make the head trainable, in fp32; returns its module names."""
    names = head_modules(model)
    for name in names:
        module = model.get_submodule(name)
        module.float().requires_grad_(True)
        module.register_forward_pre_hook(_to_fp32)
    return names


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters by their model names, fp32 on the CPU."""
    return {f"{m}.{k}": p.detach().float().cpu().contiguous() for m in head_modules(model)
            for k, p in model.get_submodule(m).named_parameters()}


def load_head(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put a saved head into the model, after checking every tensor has a place of its shape."""
    params = {f"{m}.{k}": p for m in head_modules(model) for k, p in model.get_submodule(m).named_parameters()}
    missing = sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if unknown or missing:
        raise QloraError(f"{where}: its head ({', '.join(unknown[:3]) or 'none'}) does not fit this model's "
                         f"({', '.join(missing[:3]) or 'none'}): an adapter for another architecture?")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise QloraError(f"{where}: {name} has shape {tuple(t.shape)}, this model needs "
                             f"{tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].data = t.to(params[name].device, torch.float32).clone()
