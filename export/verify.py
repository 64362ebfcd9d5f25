"""Every export checks itself: the written folder in onnxruntime vs the trained model in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qlora_rt.runtime import Model

PROMPTS = ["Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nMarch 5, 2021",
           "What is the capital of France?", "Write a haiku about the sea."]


def _prompt_ids(tokenizer, text: str) -> np.ndarray:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return np.array([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    return np.array([tokenizer(text)["input_ids"]], dtype=np.int64)


@torch.no_grad()
def _torch_greedy(model, ids: np.ndarray, n: int, eos: list[int]) -> tuple[np.ndarray, list[int]]:
    x = torch.from_numpy(ids)
    logits = model(input_ids=x).logits.float().numpy()
    seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
    stop = next((i for i, t in enumerate(seq) if t in eos), len(seq))  # the runtime's tokens exclude EOS too
    return logits, seq[:stop]


def distribution_gap(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position (rows of (T, V) logits): KL(softmax(ref) ‖ softmax(got)) in nats, and whether the most
    likely token is the same. What an approximate export must keep: the model's next-token distribution."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1), ref.argmax(-1) == got.argmax(-1)


@torch.no_grad()
def _gaps(model, runtime: Model, sequences: list[list[int]], adapter: Path | None) -> tuple[list, list]:
    kl, top1 = [], []
    for ids in sequences:
        ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        k, t = distribution_gap(ref, runtime.logits(ids, adapter))
        kl.append(k)
        top1.append(t)
    return kl, top1


def verify(folder: Path, meta, model, tokenizer, adapter: Path | None, new_tokens: int = 32,
           samples: list[list[int]] = ()) -> dict:
    """max/mean |dlogit| over the prompts' positions, greedy agreement over up to `new_tokens` tokens, and
    the next-token distributions' mean KL and top-1 agreement over the prompts' and `samples`' positions
    (token ids of examples like the ones the model serves: the calibration data)."""
    runtime = Model(folder)  # the very runtime users run the folder with
    diffs, agree, identical = [], [], 0
    prompts = [_prompt_ids(tokenizer, text) for text in PROMPTS]
    prompts.append(prompts[0][:, -1:])  # a one-token prompt: no past, the first step writes the cache
    kl, top1 = _gaps(model, runtime, list(samples), adapter)
    for ids in prompts:
        ref_logits, ref_tokens = _torch_greedy(model, ids, new_tokens, meta.eos_token_ids)
        logits = runtime.logits(ids[0].tolist(), adapter)[None]
        k, t = distribution_gap(ref_logits[0], logits[0])
        kl.append(k)
        top1.append(t)
        tokens = runtime.generate_ids([ids[0].tolist()], adapter=adapter, max_new_tokens=new_tokens)[0].tokens
        diffs.append(np.abs(logits - ref_logits))
        # both stop at end-of-sequence: agreement is the shared prefix over the longer continuation
        longest = max(len(tokens), len(ref_tokens))
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
        agree.append(prefix / longest if longest else 1.0)  # both ended at once: they agree
        identical += tokens == ref_tokens
    return {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
            "mean_abs_logit_diff": float(np.mean([d.mean() for d in diffs])),
            "greedy_new_tokens": new_tokens, "greedy_identical_prompts": identical, "prompts": len(prompts),
            "greedy_agreement": float(np.mean(agree)), "mean_kl": float(np.concatenate(kl).mean()),
            "top1_agreement": float(np.concatenate(top1).mean()), "positions": int(sum(map(len, kl)))}
