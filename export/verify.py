"""Every export checks itself: the written folder in onnxruntime vs the trained model in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PROMPTS = ["Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nMarch 5, 2021",
           "What is the capital of France?", "Write a haiku about the sea."]


def _prompt_ids(tokenizer, text: str) -> np.ndarray:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return np.array([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    return np.array([tokenizer(text)["input_ids"]], dtype=np.int64)


class OrtDecoder:
    """The smallest greedy decoder over the exported I/O: prefill, then one token a step with the KV cache."""

    def __init__(self, folder: Path, meta: dict, adapter: Path | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # LoRA inputs with rank-0 defaults are initializers on purpose
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.meta, self.run_options = meta, ort.RunOptions()
        self.adapter = None  # RunOptions does not keep the adapter alive: this object must
        if adapter is not None:
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(adapter))
            self.run_options.add_active_adapter(self.adapter)

    def forward(self, ids: np.ndarray, total: int, past: list | None) -> list[np.ndarray]:
        m = self.meta
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - ids.shape[1], total, dtype=np.int64)[None]}
        for i in range(m["layers"]):
            for j, kv in enumerate(("key", "value")):
                feed[f"past_key_values.{i}.{kv}"] = past[2 * i + j] if past else np.zeros(
                    (1, m["kv_heads"], 0, m["head_dim"]), np.float32)
        return self.session.run(None, feed, self.run_options)

    def greedy(self, ids: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
        """Prompt logits, and up to n greedy tokens (stopping after an end-of-sequence token)."""
        out = self.forward(ids, ids.shape[1], None)
        first_logits, tokens = out[0], []
        while len(tokens) < n:
            tokens.append(int(out[0][0, -1].argmax()))
            if tokens[-1] in self.meta["eos_token_ids"]:
                break
            out = self.forward(np.array([[tokens[-1]]], np.int64), ids.shape[1] + len(tokens), out[1:])
        return first_logits, tokens


@torch.no_grad()
def _torch_greedy(model, ids: np.ndarray, n: int, eos: list[int]) -> tuple[np.ndarray, list[int]]:
    x = torch.from_numpy(ids)
    logits = model(input_ids=x).logits.float().numpy()
    seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
    stop = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
    return logits, seq[:stop]


def verify(folder: Path, meta: dict, model, tokenizer, adapter: Path | None, new_tokens: int = 32) -> dict:
    """max/mean |dlogit| over the prompts' positions, and greedy agreement over up to `new_tokens` tokens."""
    dec = OrtDecoder(folder, meta, adapter)
    diffs, agree, identical = [], [], 0
    for text in PROMPTS:
        ids = _prompt_ids(tokenizer, text)
        ref_logits, ref_tokens = _torch_greedy(model, ids, new_tokens, meta["eos_token_ids"])
        logits, tokens = dec.greedy(ids, new_tokens)
        diffs.append(np.abs(logits - ref_logits))
        # both stop at end-of-sequence: agreement is the shared prefix over the longer continuation
        longest = max(len(tokens), len(ref_tokens))
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
        agree.append(prefix / longest)
        identical += tokens == ref_tokens
    return {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
            "mean_abs_logit_diff": float(np.mean([d.mean() for d in diffs])),
            "greedy_new_tokens": new_tokens, "greedy_identical_prompts": identical, "prompts": len(PROMPTS),
            "greedy_agreement": float(np.mean(agree))}
