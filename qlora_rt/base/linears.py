"""Which Linears of a transformers model are the 4-bit base: every one but a decoder's output head and an
encoder's classification head (and pooler), which are trained in full."""

from __future__ import annotations

import torch
from torch import nn

from qlora_rt.architectures import numbers
from qlora_rt.base.encoders import head_modules


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get else None


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A decoder's logits from its last hidden states, as its own forward makes them: the head, then what the
    architecture does after it (Granite's divisor, Gemma 2's soft-cap: qlora_rt/architectures.py)."""
    logits = model.get_output_embeddings()(hidden)
    n = numbers(model.config)
    if n.logits_divisor is not None:
        logits = logits / n.logits_divisor
    if n.logit_softcap:
        logits = torch.tanh(logits / n.logit_softcap) * n.logit_softcap
    return logits


def linear_names(model: nn.Module) -> list[str]:
    """The Linears `quantize_model` turns into LoRALinears: every nn.Linear but a decoder's output head and an
    encoder's classification head (and pooler), which are trained in full (qlora_rt/base/encoders.py)."""
    head = output_head(model)
    full = tuple(f"{name}." for name in head_modules(model))
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not f"{name}.".startswith(full)]
