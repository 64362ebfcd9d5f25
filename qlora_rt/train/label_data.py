"""Classification data: JSONL of labelled texts in, token ids and label ids out.

    {"text": "...", "label": "positive"}                          one text
    {"text": "...", "text_pair": "...", "label": 1}               a pair (entailment, question + passage, ...)

Labels are strings or integers. The label set is the training data's, sorted (integers by value), and
it is stored with the adapter as its label names; an eval example whose label training never saw is an
error naming its file and line. Texts longer than --seq-len tokens are truncated and counted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rt.errors import QloraError
from qlora_rt.jsonl import read_jsonl
from qlora_rt.train import text_data

FIELDS = {"text", "text_pair", "label"}


def detect(path: str | Path) -> str | None:
    """The task a data file is for, from its first example: `classify` where it has a label; None where the
    file cannot tell (unreadable, not UTF-8 JSON, empty): its reader then says what is wrong with it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return "classify" if isinstance(row, dict) and "label" in row else "causal-lm"
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        pass
    return None


def validate(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise QloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "label" not in row:
        raise QloraError(f"{where}: no 'label' (classification examples are {{\"text\": ..., \"label\": ...}})")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise QloraError(f"{where}: 'label' must be a non-empty string or an integer, got {json.dumps(label)[:40]}")
    for key in ("text", "text_pair"):
        if (key == "text" or key in row) and (not isinstance(row.get(key), str) or not row[key].strip()):
            raise QloraError(f"{where}: '{key}' must be a non-empty string")


def oddities(row: dict) -> list[str]:
    return [f"field {k!r}" for k in sorted(set(row) - FIELDS - text_data.EXTRA_OK)]


FEW = 5  # a label with fewer training examples than this is warned about: the head can barely learn it


def read(path: str | Path, flag: str) -> tuple[list[dict], list[int]]:
    """The file's examples, validated, and the line each came from; the file uses one shape (pairs or not)."""
    lines: list[int] = []
    rows = read_jsonl(path, flag, validate, oddities, lines)
    paired = [i for i, r in enumerate(rows) if "text_pair" in r]
    if paired and len(paired) != len(rows):
        single = next(i for i, r in enumerate(rows) if "text_pair" not in r)
        raise QloraError(f"{path}: line {lines[paired[0]]} has a 'text_pair' and line {lines[single]} does not; a "
                         "classifier reads one shape: give every line a text_pair, or none")
    return rows, lines


def label_names(rows: list[dict], lines: list[int] | None = None, path: str | Path = "--data") -> list[str]:
    """The label set, sorted: integers by value (0, 1, 2, ... keep their ids), anything else as text. At least
    two labels, and no two that read the same as text (1 and "1")."""
    first: dict[str, tuple[object, int]] = {}
    counts: dict[str, int] = {}
    for n, r in enumerate(rows):
        key, line = str(r["label"]), lines[n] if lines else n + 1
        if key in first and type(first[key][0]) is not type(r["label"]):
            raise QloraError(f"{path}: labels {first[key][0]!r} (line {first[key][1]}) and {r['label']!r} (line "
                             f"{line}) are one name to the classifier; write every label the same way")
        first.setdefault(key, (r["label"], line))
        counts[key] = counts.get(key, 0) + 1
    if len(first) < 2:
        only = f"only the label {next(iter(first))!r}" if first else "no labels"
        raise QloraError(f"{path}: {only} in {len(rows)} example(s); a classifier needs at least two labels")
    few = sorted(k for k, c in counts.items() if c < FEW)
    if few:
        print(f"{path}: warning: label(s) {', '.join(few[:6])} have fewer than {FEW} examples; the classifier "
              "will barely learn them", file=sys.stderr)
    values = [v for v, _ in first.values()]
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(first)


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int


def encode(rows: list[dict], tokenizer, seq_len: int, labels: list[str], path: str,
           lines: list[int] | None = None, token_types: bool = True) -> list[Encoded]:
    """Token ids (truncated to seq_len, counted in one warning) and label ids of validated rows."""
    ids = {name: i for i, name in enumerate(labels)}
    for n, row in enumerate(rows):
        if str(row["label"]) not in ids:
            line = lines[n] if lines else n + 1
            shown = ", ".join(labels[:8]) + (" …" if len(labels) > 8 else "")
            raise QloraError(f"{path}:{line}: label {row['label']!r} is not one of the training data's labels "
                             f"({shown}); the classifier has no output for it")
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None  # one shape: `read`
    enc = tokenizer(texts, pairs)
    long = [i for i, t in enumerate(enc["input_ids"]) if len(t) > seq_len]
    if long:  # only these are tokenized again, cut to seq_len (the longer of a pair is cut first)
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None, truncation=True,
                        max_length=seq_len)
        for key in enc:
            for j, i in enumerate(long):
                enc[key][i] = cut[key][j]
        print(f"{path}: warning: {len(long)} of {len(rows)} examples are longer than {seq_len} tokens and were "
              "truncated", file=sys.stderr)
    types = enc.get("token_type_ids") if token_types else None
    return [Encoded(enc["input_ids"][i], types[i] if types is not None else None, ids[str(r["label"])])
            for i, r in enumerate(rows)]


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids, attention_mask (and token_type_ids) (B, T), labels (B,)."""
    T = max(len(e.input_ids) for e in examples)
    out = {"input_ids": torch.full((len(examples), T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), T), dtype=torch.long)}
    if examples[0].token_type_ids is not None:
        out["token_type_ids"] = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        out["input_ids"][i, :n] = torch.tensor(e.input_ids)
        out["attention_mask"][i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.tensor(e.token_type_ids)
    out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return out
