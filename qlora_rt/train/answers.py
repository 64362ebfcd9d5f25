"""Greedy answers from the PyTorch model: the demo's scorer and the reference the ONNX side must match."""

from __future__ import annotations

import torch


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the last assistant turn."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last]


def reference_answer(row: dict) -> str:
    return [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer, conversations: list[list[dict]] | list[str], max_new_tokens: int = 32,
           batch_size: int = 16) -> list[str]:
    """Greedy completions of chat conversations (through the chat template) or of plain prompts (tokenized as
    training tokenizes a prompt: with the tokenizer's special tokens), batched with left padding."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            batch = conversations[i:i + batch_size]
            plain = isinstance(batch[0], str)
            texts = batch if plain else [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                                         for c in batch]
            enc = tokenizer(texts, add_special_tokens=plain, padding=True, return_tensors="pt").to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)
