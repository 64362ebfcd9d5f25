"""Training data: JSONL in, token ids and loss masks out.

One example a line, in one of three shapes:
    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only
    {"messages": [{"role": ..., "content": ...}, ...]} rendered with the model's chat template,
                                                      loss on the assistant turns only
Labels use -100 for "no loss" (the convention transformers' loss functions share).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rt.errors import QloraError
from qlora_rt.jsonl import read_jsonl

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # packed rows (`pack`): each token's position within its own example, restarting at 0 where one begins
    positions: list[int] | None = None


SHAPES = {"messages": {"messages"}, "prompt": {"prompt", "completion"}, "text": {"text"}}
ROLES = {"system", "user", "assistant", "tool", "developer"}
EXTRA_OK = {"id", "meta", "metadata", "source"}  # bookkeeping fields that are plainly not part of the example


def read_examples(path: str | Path, flag: str = "--data", lines: list[int] | None = None) -> list[dict]:
    """Every line of a causal-LM data file, checked against the shapes above (errors name file:line)."""
    return read_jsonl(path, flag, _validate, _oddities, lines)


def _validate(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise QloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise QloraError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise QloraError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise QloraError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise QloraError(f"{where}: '{key}' must be a string (prompt/completion examples need both)")
        if not row["completion"]:
            raise QloraError(f"{where}: 'completion' is empty, so there is nothing to learn")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise QloraError(f"{where}: 'text' must be a non-empty string")
    else:
        raise QloraError(f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' field, "
                         f"got {', '.join(sorted(row)) or 'an empty object'}")


def _oddities(row: dict) -> list[str]:
    """What a validated row carries that training ignores: fields beside its shape, roles no template knows."""
    shape = next(k for k in SHAPES if k in row)
    out = [f"field {k!r}" for k in sorted(set(row) - SHAPES[shape] - EXTRA_OK)]
    if shape == "messages":
        out += sorted({f"role {m['role']!r}" for m in row["messages"] if m["role"] not in ROLES})
    return out


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _assistant_spans(tokenizer, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return it and the character spans of the assistant turns.

    Each assistant turn i spans from the end of render(msgs[:i], generation prompt) to the end of
    render(msgs[:i+1]): the template's own turn-closing tokens fall inside, so the model learns to stop.
    """
    def render(m: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    if not getattr(tokenizer, "chat_template", None):
        raise QloraError(f"{where}: 'messages' examples need a chat template, and this tokenizer has none")
    full = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (full.startswith(start) and full.startswith(end)):
            raise QloraError(f"{where}: the chat template renders earlier turns differently once later ones "
                             "are added, so assistant tokens cannot be located; use prompt/completion instead")
        spans.append((len(start), len(end)))
    return full, spans


def tokenize(row: dict, tokenizer, seq_len: int, where: str = "example") -> Example:
    """Token ids and labels for one validated row, truncated to seq_len."""
    if "messages" in row:
        text, spans = _assistant_spans(tokenizer, row["messages"], where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE
                  for t, (a, _) in zip(ids, enc["offset_mapping"])]
    elif "prompt" in row:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        ids = tokenizer(row["text"])["input_ids"] + _eos(tokenizer)
        labels = list(ids)
    return Example(ids[:seq_len], labels[:seq_len])


def load_examples(path: str | Path, tokenizer, seq_len: int,
                  rows: list[dict] | None = None) -> tuple[list[Example], int]:
    """Tokenized examples with at least one label token after truncation, and how many were dropped.
    rows: the file's rows when `read_examples` already read them."""
    rows = read_examples(path) if rows is None else rows
    examples = [tokenize(r, tokenizer, seq_len, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    kept = [e for e in examples if sum(t != IGNORE for t in e.labels[1:]) > 0]
    if not kept:
        raise QloraError(f"{path}: no example has a token to learn from after truncation to --seq-len {seq_len}")
    return kept, len(examples) - len(kept)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T). Packed rows add
    position_ids (B, T): each example's own positions, a row's padding a sequence of its own after them."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.positions is not None for e in examples):
        positions = torch.arange(T).repeat(len(examples), 1)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            positions[i, :n] = torch.tensor(e.positions if e.positions is not None else range(n))
            positions[i, n:] = torch.arange(T - n)
        batch["position_ids"] = positions
    return batch


def pack(examples: list[Example], capacity: int) -> list[Example]:
    """The examples packed whole into rows of at most `capacity` tokens, best fit, longest first (fewest rows
    for the tokens, no example split). A row's examples attend each to itself only: each keeps its own positions
    (0, 1, ... from its start: `positions`), from which the model's mask is block-diagonal, and the first token of
    each gets no label, so no example learns to predict the next one's start. The rows are in a fixed order (the
    same data packs the same), the examples within a row in their order in the file."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    room: list[tuple[int, int]] = []  # (free tokens, row), kept sorted: the tightest row that fits is a bisect
    rows: list[list[int]] = []
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, row = capacity - n, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= n
        bisect.insort(room, (free, row))
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            positions += range(len(e.input_ids))
        packed.append(Example(ids, labels, positions))
    return packed


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label t is predicted from position t-1)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Order:
    """A reproducible stream of example indices: a fresh seeded permutation per epoch.

    The position in the stream is two integers (epoch, index), which is all a checkpoint needs to
    continue exactly where an interrupted run stopped.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            out.append(self._perm[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def steps_for_epochs(epochs: float, n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * n_examples / (batch_size * grad_accum)))
