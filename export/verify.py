"""Every export checks itself: the written folder in onnxruntime vs the trained model in PyTorch.

PyTorch's side is the expensive one (each forward dequantizes every 4-bit weight), so it runs as few
forwards as it can: the sequences are batched (right-padded, so no real position sees a pad), and the
greedy check is teacher-forced: onnxruntime generates, and one PyTorch forward over prompt +
continuation says, position by position, whether PyTorch's greedy choice is the token onnxruntime
chose. Their first disagreement is where PyTorch's own greedy decode would have left onnxruntime's:
the same prefix, at the cost of one forward instead of one per new token. onnxruntime runs its
side batched too (left-padded, as users' batches are). (What that saves: docs/benchmarks.md, "Measurements
behind the code".)
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path

import numpy as np
import torch

from qlora_rt.base.memory import release_freed_memory
from qlora_rt.runtime import Model

PROMPTS = ["Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nMarch 5, 2021",
           "What is the capital of France?", "Write a haiku about the sea."]
ONE_TOKEN_STEPS = 8  # new tokens checked after the one-token prompt
LOGITS_PER_BATCH = 2**24  # float32 logits of one batch (64 MiB a side): bounds the check's extra memory
SPILL_FROM = 2**20  # bytes: tensors this large wait on disk while onnxruntime runs


def _prompt_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def batches(lengths: list[int], vocab: int, budget: int = LOGITS_PER_BATCH) -> list[list[int]]:
    """Indices of sequences grouped for batched forwards, longest first, each batch's padded logits
    (rows x longest x vocab) within `budget` floats (a sequence alone may exceed it)."""
    order, out = sorted(range(len(lengths)), key=lengths.__getitem__), []
    while order:
        batch = [order.pop()]
        while order and (len(batch) + 1) * lengths[batch[0]] * vocab <= budget:
            batch.append(order.pop())
        out.append(batch)
    return out


@torch.no_grad()
def torch_logits(model, sequences: list[list[int]], alone: bool = False) -> list[np.ndarray]:
    """(T, V) float32 logits of each token sequence, from one right-padded forward: no real position
    attends to a pad. alone: a forward per sequence (LongRoPE picks its tables on a forward's length, so
    in a batch a sequence's logits depend on the longest beside it; the runtime runs each alone)."""
    if alone and len(sequences) > 1:
        return [out for seq in sequences for out in torch_logits(model, [seq])]
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[row, :len(seq)].numpy() for row, seq in enumerate(sequences)]


def greedy_prefix(ref_logits: np.ndarray, n_prompt: int, tokens: list[int], finish: str,
                  eos: list[int]) -> tuple[int, int]:
    """How far PyTorch's greedy decode follows onnxruntime's: ref_logits are PyTorch's over prompt + `tokens`
    (onnxruntime's continuation, EOS excluded). Returns (agreeing steps, steps compared): a step is one
    chosen token, plus the stop when onnxruntime ended at end-of-sequence."""
    picks = ref_logits[n_prompt - 1:].argmax(-1)  # PyTorch's choice after each prefix
    steps = len(tokens) + (finish == "stop")  # run without stop strings: "stop" is end-of-text
    for i in range(steps):
        if (picks[i] not in eos) if i == len(tokens) else (picks[i] != tokens[i]):
            return i, steps
    return steps, steps


def distribution_gap(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position (rows of (T, V) logits): KL(softmax(ref) ‖ softmax(got)) in nats, and whether the most
    likely token is the same. What an approximate export must keep: the model's next-token distribution."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1), ref.argmax(-1) == got.argmax(-1)


@contextlib.contextmanager
def weights_on_disk(model: torch.nn.Module, scratch: Path, min_bytes: int | None = None):
    """The model's large tensors (4-bit bytes, embeddings, head) wait in a file under `scratch` and are read
    back, bit for bit, on leaving: onnxruntime's session holds its own copy of the weights, and PyTorch's
    need not sit beside it (at the Llama-3.2-1B shape each is ~1 GB). A disk that cannot take them (full,
    read-only) leaves them in memory: the check then only needs more memory, never gives another answer."""
    min_bytes = SPILL_FROM if min_bytes is None else min_bytes
    seen, spilled = set(), []
    path = Path(scratch) / "weights.bin"
    def owns_storage(t: torch.Tensor) -> bool:  # not a view that shares its bytes with another tensor
        nbytes = t.numel() * t.element_size()
        return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes

    tensors = [t for t in [*model.parameters(), *model.buffers()]
               if t.device.type == "cpu" and t.numel() * t.element_size() >= max(min_bytes, 1) and owns_storage(t)
               and not (id(t) in seen or seen.add(id(t)))]
    try:
        with open(path, "wb") as f:
            for t in tensors:
                data = t.data
                f.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
                f.flush()  # on disk before the memory goes: a full disk fails here, not after
                spilled.append((t, data.dtype, data.shape))
                t.data = torch.empty(0, dtype=data.dtype)
    except OSError:
        pass  # what was spilled is read back below; the rest stays where it is
    release_freed_memory()
    try:
        yield
    finally:
        if spilled:
            with open(path, "rb") as f:
                for t, dtype, shape in spilled:
                    data = torch.empty(shape, dtype=dtype)
                    view = memoryview(data.view(-1).view(torch.uint8).numpy())
                    if f.readinto(view) != len(view):
                        raise OSError(f"{path} was cut short while the export checked itself")
                    t.data = data
        path.unlink(missing_ok=True)


def verify(folder: Path, meta, model, tokenizer, adapter: Path | None, new_tokens: int = 32,
           samples: list[list[int]] = (), budget: int = LOGITS_PER_BATCH) -> dict:
    """max/mean |dlogit| over the prompts' positions, greedy agreement over up to `new_tokens` tokens (8
    after the one-token prompt), and the next-token distributions' mean KL and top-1 agreement over the
    prompts' and `samples`' positions (token ids of examples like the ones the model serves: the
    calibration data).

    onnxruntime's side runs first, with PyTorch's weights waiting on disk, and its logits wait on disk
    too, a batch of at most `budget` a file; its session is closed before PyTorch's side, so the two
    never hold their weights or working memory at once (at the Llama-3.2-1B shape each model is ~1 GB)."""
    prompts = [_prompt_ids(tokenizer, text) for text in PROMPTS]
    # a one-token prompt last, alone: no past, the first step writes the cache (a few steps after it
    # suffice: longer decodes are the path the other prompts take)
    prompts.append(prompts[0][-1:])
    inputs = [list(s) for s in samples] + prompts  # what onnxruntime computes logits of
    kl, top1, diffs, agree, identical = [], [], [], [], 0
    with tempfile.TemporaryDirectory(prefix="qlora-rt-verify-") as scratch:
        with weights_on_disk(model, Path(scratch)):
            runtime = Model(folder)  # the very runtime users run the folder with
            runs = runtime.generate_ids(prompts[:-1], adapter=adapter, max_new_tokens=new_tokens)
            runs += runtime.generate_ids(prompts[-1:], adapter=adapter,
                                         max_new_tokens=min(new_tokens, ONE_TOKEN_STEPS))
            forced = inputs[:len(samples)] + [ids + run.tokens for ids, run in zip(prompts, runs)]  # + continuation
            plan = batches([len(s) for s in forced], meta.vocab, budget)
            for b, batch in enumerate(plan):
                np.savez(Path(scratch) / f"{b}.npz", *runtime.logits_batch([inputs[i] for i in batch], adapter))
            del runtime
            gc.collect()
        for b, batch in enumerate(plan):
            long_rope = bool(meta.long_rope_from)
            refs = torch_logits(model, [forced[i] for i in batch], alone=long_rope)
            with np.load(Path(scratch) / f"{b}.npz") as saved:
                gots = [saved[f"arr_{j}"] for j in range(len(batch))]
            for i, ref, got in zip(batch, refs, gots):
                # LongRoPE: the prompt's logits as the runtime computed them, from the prompt alone (with its
                # continuation the sequence may pass the switch and every position take the long tables)
                mine = torch_logits(model, [inputs[i]])[0] if long_rope and len(forced[i]) > len(got) else ref
                k, t = distribution_gap(mine[:len(got)], got)
                kl.append(k)
                top1.append(t)
                if i >= len(samples):
                    run = runs[i - len(samples)]
                    diffs.append(np.abs(got - mine[:len(got)]))
                    same, steps = greedy_prefix(ref, len(got), run.tokens, run.finish_reason, meta.eos_token_ids)
                    agree.append(same / steps if steps else 1.0)
                    identical += same == steps
            del refs, gots
    return {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
            "mean_abs_logit_diff": float(np.mean([d.mean() for d in diffs])),
            "greedy_new_tokens": new_tokens, "greedy_identical_prompts": identical, "prompts": len(prompts),
            "greedy_agreement": float(np.mean(agree)), "mean_kl": float(np.concatenate(kl).mean()),
            "top1_agreement": float(np.concatenate(top1).mean()), "positions": int(sum(map(len, kl)))}
