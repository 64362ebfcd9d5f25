"""What a training task is, over the one loop in qlora_rt/train/run.py: its examples, batches, loss and metrics.
A family's task is `TASKS[family.task]` (qlora_rt/families.py): `read`, `read_labels`, then `build` for a model.

    causal-lm   decoders: next-token loss on the completion / assistant tokens (qlora_rt/train/text_data.py)
    classify    encoders: a label per text (or text pair), cross-entropy on the classification head's logits,
                accuracy, macro-F1 and the confusion matrix (qlora_rt/label_data.py)

A step's loss is the sum over its micro-batches of (sum of per-unit losses) / (units in the whole step),
where a unit is a target token (causal-lm) or an example (classify): accumulation weighs every unit alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_rt.base.encoders import max_tokens, takes_token_types
from qlora_rt.base.linears import output_logits
from qlora_rt.train import label_data, text_data


class CausalLM:
    name = "causal-lm"

    def __init__(self, tokenizer, seq_len: int) -> None:
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.pad_id = tokenizer.pad_token_id

    @staticmethod
    def read_labels(rows: list[dict], lines: list[int], path: str) -> None:
        """The label names the data holds: none, a language model predicts tokens."""
        return None

    @classmethod
    def build(cls, tokenizer, model: torch.nn.Module, seq_len: int, labels: None) -> CausalLM:
        return cls(tokenizer, seq_len)

    @staticmethod
    def read(path: str | Path, flag: str) -> tuple[list[dict], list[int]]:
        lines: list[int] = []
        return text_data.read_examples(path, flag, lines=lines), lines

    def examples(self, path: str | Path, rows: list[dict], lines: list[int]) -> tuple[list, int]:
        """Tokenized examples, and how many were dropped (no target token left after truncation)."""
        return text_data.load_examples(path, self.tokenizer, self.seq_len, rows=rows)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return text_data.collate(examples, self.pad_id)

    PACK_SAVING = 1 / 8  # pack a micro-batch where that computes at least this much fewer slots than padding it

    def pack(self, examples: list) -> list:
        """--packing: a micro-batch's examples in rows (text_data.pack) of the length, between the longest example
        and --seq-len, whose rows hold the fewest slots (rows x the longest row), where those are at least
        PACK_SAVING fewer than the padded batch's; else the examples as they are (examples of like length gain
        nothing, and packed rows cost a little more a slot: their attention mask is built from the positions)."""
        lengths = [len(e.input_ids) for e in examples]
        longest, total = max(lengths), sum(lengths)
        best = (len(examples) * longest * (1 - self.PACK_SAVING), examples)
        for capacity in sorted({longest, *(-(-total // k) for k in range(1, len(examples) + 1))}):
            if not longest <= capacity <= max(self.seq_len, longest):
                continue
            rows = text_data.pack(examples, capacity)
            slots = len(rows) * max(len(r.input_ids) for r in rows)
            if slots <= best[0]:
                best = slots, rows
        return best[1]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return text_data.count_targets(batch)

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_units: int) -> torch.Tensor:
        """Sum of token cross-entropies / n_units, with the output head applied only where a label is.

        The head of a small model is a large share of its compute (SmolLM2-135M: 49k x 576), and in chat
        data most positions carry no loss: skipping them makes a step faster for the same loss.
        """
        if "position_ids" in batch:  # packed rows: the mask made block-diagonal from the positions (no 2-D mask)
            hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False).last_hidden_state
        else:
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).last_hidden_state  # (B, T, d)
        labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        keep = labels != text_data.IGNORE
        return token_losses(model, hidden[:, :-1][keep], labels[keep]) / n_units

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device: torch.device) -> dict:
        """Mean token loss over the examples (exp of it is the perplexity)."""
        total, count = 0.0, 0
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[i:i + batch_size]).items()}
            n = self.units(batch)
            total += self.loss(model, batch, n).item() * n
            count += n
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    @staticmethod
    def describe(metrics: dict | None) -> str:
        return "-" if metrics is None else f"{metrics['eval_loss']:.4f} (ppl {metrics['eval_ppl']:.2f})"


LOSS_CHUNK = 1 << 26  # logits made at a time (256 MiB in fp32): a chunk of positions, whatever the vocabulary


def token_losses(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy of (N, d) hidden states against (N,) targets, the head applied LOSS_CHUNK logits at a time,
    so the loss never holds N x vocabulary logits and their gradient (Gemma 3's 262,144-token vocabulary: 1 GiB
    each in fp32 for 4 x 256 positions). A frozen head (QLoRA's) takes each chunk's forward and backward at once
    and keeps only the gradient of its hidden states (`_ChunkedLoss`): the head runs as often as unchunked, per
    chunk. One chunk where all positions fit: the plain product."""
    head = model.get_output_embeddings()
    step = max(1, LOSS_CHUNK // head.out_features)
    if hidden.shape[0] <= step:
        return _chunk_loss(model, hidden, targets)
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # evaluation: the losses alone
        return sum(_chunk_loss(model, hidden[i:i + step], targets[i:i + step])
                   for i in range(0, hidden.shape[0], step))
    if any(p.requires_grad for p in head.parameters()):  # its own gradient needs the graph: recompute in backward
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], step):
            total = total + checkpoint(_chunk_loss, model, hidden[i:i + step], targets[i:i + step],
                                       use_reentrant=False)
        return total
    return _ChunkedLoss.apply(hidden, targets, model, step)


def _chunk_loss(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output_logits(model, hidden).float(), targets, reduction="sum")


class _ChunkedLoss(torch.autograd.Function):
    """Forward: each chunk's loss and, at once, the gradient of its hidden states (the head frozen); backward:
    those gradients times the incoming one."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, model: torch.nn.Module, step: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], step):
            with torch.enable_grad():
                h = hidden[i:i + step].detach().requires_grad_(True)
                loss = _chunk_loss(model, h, targets[i:i + step])
                (grads[i:i + step],) = torch.autograd.grad(loss, h)
            total += loss.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grads * grad.to(grads.dtype), None, None, None


class Classify:
    name = "classify"

    def __init__(self, tokenizer, seq_len: int, labels: list[str], token_types: bool = True) -> None:
        self.tokenizer, self.seq_len, self.labels, self.token_types = tokenizer, seq_len, labels, token_types
        self.pad_id = tokenizer.pad_token_id

    read = staticmethod(label_data.read)
    read_labels = staticmethod(label_data.label_names)  # (rows, lines, path): the label set, sorted

    @classmethod
    def build(cls, tokenizer, model: torch.nn.Module, seq_len: int, labels: list[str]) -> Classify:
        """seq_len within the encoder's position table; token type ids where the architecture takes them."""
        return cls(tokenizer, min(seq_len, max_tokens(model.config)), labels,
                   takes_token_types(model.config.model_type))

    def examples(self, path: str | Path, rows: list[dict], lines: list[int]) -> tuple[list, int]:
        return label_data.encode(rows, self.tokenizer, self.seq_len, self.labels, str(path), lines,
                                    self.token_types), 0

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return label_data.collate(examples, self.pad_id)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    @staticmethod
    def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()  # (B, labels)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], n_units: int) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="sum") / n_units

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device: torch.device) -> dict:
        """Mean loss, accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted)."""
        total, truth, pred = 0.0, [], []
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[i:i + batch_size]).items()}
            logits = self.logits(model, batch)
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            truth += batch["labels"].tolist()
            pred += logits.argmax(-1).tolist()
        return {"eval_loss": total / max(len(truth), 1), **scores(truth, pred, len(self.labels))}

    @staticmethod
    def describe(metrics: dict | None) -> str:
        return "-" if metrics is None else (f"loss {metrics['eval_loss']:.4f}, accuracy "
                                            f"{100 * metrics['eval_accuracy']:.1f}%, macro-F1 "
                                            f"{100 * metrics['eval_macro_f1']:.1f}%")


TASKS = {task.name: task for task in (CausalLM, Classify)}


def scores(truth: list[int], pred: list[int], n_labels: int) -> dict:
    """Accuracy, macro-F1 (the mean of each label's F1 over the labels that occur in truth or predictions;
    a label's F1 is 0 where it was never predicted or never right) and the confusion matrix."""
    confusion = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, pred):
        confusion[t][p] += 1
    f1s = []
    for k in range(n_labels):
        tp = confusion[k][k]
        predicted, actual = sum(row[k] for row in confusion), sum(confusion[k])
        if predicted or actual:
            f1s.append(2 * tp / (predicted + actual))
    return {"eval_accuracy": sum(confusion[k][k] for k in range(n_labels)) / max(len(truth), 1),
            "eval_macro_f1": sum(f1s) / max(len(f1s), 1), "eval_confusion": confusion}


def confusion_table(confusion: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as text: a row per true label, a column per predicted one."""
    width = max(6, *(len(l) for l in labels)) + 2
    lines = ["true \\ predicted".ljust(width + 4) + "".join(l[:width - 2].rjust(width) for l in labels)]
    for label, row in zip(labels, confusion):
        lines.append(label[:width].ljust(width + 4) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
