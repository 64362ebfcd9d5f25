"""Offline text classification with an exported encoder: onnxruntime, numpy and tokenizers only (no torch).

    clf = Classifier("runs/sentiment-onnx")
    clf.classify(["great phone, terrible battery"], adapter="sentiment")
    # [Prediction(label='negative', probs={'negative': 0.71, 'positive': 0.29})]

A merged export holds its head and label names. An adapter-aware export's head comes with each adapter
(`adapters/NAME.onnx_adapter`: LoRA, head, label names), activated per call with onnxruntime's
`RunOptions.add_active_adapter`; with a single adapter in the folder it is the default.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qlora_rt.errors import QloraError
from qlora_rt.files import disk_full
from qlora_rt.jsonl import read_jsonl
from qlora_rt.runtime import manifest
from qlora_rt.runtime.session import (
    HEAD_LABELS,
    adapter_names,
    file_signature,
    find_adapter,
    open_session,
    read_adapter_file,
)


@dataclass
class Prediction:
    label: str
    probs: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class Classifier:
    """An exported qlora-rt encoder folder, ready to classify; adapters by name or path."""

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        self.folder = Path(folder)
        self.meta = manifest.read(self.folder)
        manifest.expect(self.meta, "encoder", self.folder, "classify")
        self.session = open_session(self.folder, threads)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise QloraError(f"{self.folder} has no tokenizer.json (the export writes one)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.meta.max_length)
        self.pad_id = self.meta.pad_token_id or 0
        self._adapters: dict[Path, tuple] = {}  # each file's (signature, (LoraAdapter, labels)): read again on change
        self.truncated = 0  # texts cut to max_length so far (the CLI reports it)

    @property
    def adapter_names(self) -> list[str]:
        return adapter_names(self.folder)

    def _adapter(self, name_or_path: str | Path | None) -> tuple[ort.LoraAdapter | None, list[str]]:
        """The adapter to activate (None for a merged export) and the label names it brings."""
        if self.meta.mode == "merged":
            if name_or_path:
                raise QloraError(f"--adapter: {self.folder} is a merged export; its adapter and head are in the "
                                 "weights")
            return None, self.meta.labels or []
        if name_or_path is None:
            names = self.adapter_names
            if len(names) != 1:
                raise QloraError(f"{self.folder}: the classifier head comes with each adapter; pass --adapter NAME "
                                 f"(available: {', '.join(names) or 'none; add one with qlora-rt export-adapter'})")
            name_or_path = names[0]
        path = find_adapter(self.folder, name_or_path)
        signature = file_signature(path)
        held = self._adapters.get(path)
        if held is None or held[0] != signature:
            self._adapters[path] = held = signature, self._read_adapter(path)
        return held[1]

    def forget(self, name_or_path: str | Path) -> None:
        """Free an adapter read before (the server's unload)."""
        self._adapters.pop(find_adapter(self.folder, name_or_path), None)

    def _read_adapter(self, path: Path) -> tuple[ort.LoraAdapter, list[str]]:
        params = read_adapter_file(path, self.meta)
        if HEAD_LABELS not in params:
            raise QloraError(f"--adapter: {path.name} brings no classification head (an adapter for a decoder?)")
        labels = json.loads(bytes(params[HEAD_LABELS].numpy()).decode())
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter, labels

    def labels(self, adapter: str | Path | None = None) -> list[str]:
        return self._adapter(adapter)[1]

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch: token ids right-padded to the longest, mask, token types."""
        if not texts:
            raise QloraError("no texts to classify")
        if pairs is not None and len(pairs) != len(texts):
            raise QloraError(f"{len(texts)} texts but {len(pairs)} text pairs")
        for i, t in enumerate(texts + (pairs or [])):
            if not isinstance(t, str) or not t.strip():
                raise QloraError(f"text {i % len(texts) + 1} is empty" if isinstance(t, str) else
                                 f"text {i % len(texts) + 1} is not a string")
        encs = self.tokenizer.encode_batch(list(zip(texts, pairs)) if pairs else texts)
        self.truncated += sum(bool(e.overflowing) for e in encs)
        T = max(len(e.ids) for e in encs)
        feeds = {"input_ids": np.full((len(encs), T), self.pad_id, np.int64),
                 "attention_mask": np.zeros((len(encs), T), np.int64)}
        if self.meta.token_type_ids:
            feeds["token_type_ids"] = np.zeros((len(encs), T), np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            feeds["input_ids"][i, :n] = e.ids
            feeds["attention_mask"][i, :n] = 1
            if self.meta.token_type_ids:
                feeds["token_type_ids"][i, :n] = e.type_ids
        return feeds

    def logits(self, feeds: dict[str, np.ndarray], adapter: str | Path | None = None) -> np.ndarray:
        """(B, labels) logits for encoded inputs."""
        lora, labels = self._adapter(adapter)
        options = ort.RunOptions()
        if lora is not None:
            options.add_active_adapter(lora)
        logits = self.session.run(["logits"], feeds, options)[0]
        if logits.shape[-1] != len(labels):
            raise QloraError(f"{self.folder}: the head gives {logits.shape[-1]} scores for {len(labels)} label names")
        return logits

    def classify(self, texts: str | list[str], pairs: str | list[str] | None = None, *,
                 adapter: str | Path | None = None, batch_size: int = 32) -> list[Prediction]:
        """The most likely label of each text (or text pair) and every label's probability, in input order.
        Texts are batched by length, so a batch pads to about its own texts' length, not the longest one's."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pairs = [pairs] if isinstance(pairs, str) else pairs
        labels = self.labels(adapter)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
        out: list[Prediction | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            feeds = self.encode([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None)
            for i, p in zip(rows, softmax(self.logits(feeds, adapter))):
                out[i] = Prediction(labels[int(p.argmax())], {l: float(v) for l, v in zip(labels, p)})
        return out


def classify_file(clf: Classifier, path: Path, out: Path | None, adapter: str | None, batch_size: int) -> int:
    """One prediction line per input line ({"text"[, "text_pair"]}), written to `out` or printed when it is
    None; returns the count. A regular file is written whole or not at all (a temp file renamed into place);
    a link or a device (/dev/stdout, a named pipe) is written through, never replaced."""
    if out is not None:
        if out.is_dir():
            raise QloraError(f"--output: {out} is a folder; expected a file name for the predictions")
        if out.exists() and out.resolve() == path.resolve():
            raise QloraError(f"--output: {out} is the --input file; write the predictions elsewhere")
        if not out.parent.is_dir():
            raise QloraError(f"--output: folder {out.parent} does not exist")

    def check(row: object, where: str) -> None:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise QloraError(f"{where}: expected an object with a non-empty 'text'")
        if "text_pair" in row and (not isinstance(row["text_pair"], str) or not row["text_pair"].strip()):
            raise QloraError(f"{where}: 'text_pair' must be a non-empty string")

    rows = read_jsonl(path, "--input", check)
    has_pairs = ["text_pair" in r for r in rows]
    if any(has_pairs) and not all(has_pairs):
        raise QloraError(f"--input {path}: some lines have a 'text_pair' and some do not; use one shape")
    preds = clf.classify([r["text"] for r in rows], [r["text_pair"] for r in rows] if all(has_pairs) else None,
                         adapter=adapter, batch_size=batch_size)
    lines = "".join(json.dumps({"label": p.label, "probs": p.probs}) + "\n" for p in preds)
    if out is None:
        sys.stdout.write(lines)
        return len(preds)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.is_symlink() or (out.exists() and not out.is_file()):  # a device (/dev/stdout) or a link: as it is
            with open(out, "w") as f:
                f.write(lines)
            return len(preds)
        tmp.write_text(lines)
        tmp.replace(out)
    except OSError as e:
        why = "the disk is full" if disk_full(e) else (e.strerror or str(e)).lower()
        raise QloraError(f"--output {out}: {why}; {len(preds)} predictions not written, and {out} was left as it "
                         "was") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder that cannot be written either
            pass
    return len(preds)


def warn_truncated(clf: Classifier, total: int) -> None:
    if clf.truncated:
        print(f"warning: {clf.truncated} of {total} inputs are longer than {clf.meta.max_length} tokens and were "
              "truncated", file=sys.stderr)
