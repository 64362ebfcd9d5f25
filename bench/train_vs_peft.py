"""qlora-rt training vs PEFT + bitsandbytes + transformers on the same config, in one run.

Both sides start from the same fp32 weights (the bundled SmolLM2-135M GGUF, saved once as an HF
folder), quantize them to NF4 + double quantization (block 64), put r=16 LoRA on all linear layers,
and train on the same batches in the same order (the same tokenization and sampler) with AdamW and
the same cosine schedule. Each side runs in its own process so peak RSS is its own.

    python bench/train_vs_peft.py [--steps 60] [--batch-size 4] [--seq-len 256] [--threads 2]

Prints a table: tokens/s, seconds per step, peak RSS, first/last loss, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "dates-train.jsonl"


def export_fp32(folder: Path) -> None:
    """The GGUF as an fp32 HF checkpoint (transformers will not save a GGUF-loaded model itself)."""
    from qlora_rt.base.load import load
    from qlora_rt.merge import save_merged

    loaded = load("smollm2-135m")
    save_merged(loaded.model, loaded.tokenizer, folder)


def batches(tokenizer, steps: int, batch_size: int, seq_len: int, seed: int = 0):
    from qlora_rt.train.text_data import Order, collate, load_examples

    examples, _ = load_examples(DATA, tokenizer, seq_len)
    order = Order(len(examples), seed)
    return [collate([examples[i] for i in order.take(batch_size)], tokenizer.pad_token_id) for _ in range(steps)]


def run_ours(model_dir: str, steps: int, batch_size: int, seq_len: int, out: str) -> dict:
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    r = train(TrainConfig(model=model_dir, data=str(DATA), out=out, steps=steps, batch_size=batch_size,
                          seq_len=seq_len, rank=16, alpha=32, dropout=0.05, targets="all-linear", quant="nf4",
                          double_quant=True, checkpoint_every=0, eval_every=0, log_every=10))
    losses = [json.loads(l)["loss"] for l in open(Path(out) / "metrics.jsonl") if '"loss"' in l]
    return {"tokens_per_s": r.tokens_per_s, "first_loss": losses[0], "last_loss": losses[-1]}


def run_peft(model_dir: str, steps: int, batch_size: int, seq_len: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                                 dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * steps), steps)  # as qlora-rt
    data = batches(tok, steps, batch_size, seq_len)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "first_loss": losses[0], "last_loss": losses[-1]}


def child(args: argparse.Namespace) -> None:
    import torch

    from qlora_rt.train.report import peak_rss_mib

    torch.set_num_threads(args.threads)
    if args.side == "ours":
        result = run_ours(args.model_dir, args.steps, args.batch_size, args.seq_len, tempfile.mkdtemp() + "/run")
    else:
        result = run_peft(args.model_dir, args.steps, args.batch_size, args.seq_len)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--side", choices=["ours", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = str(Path(tmp) / "smollm2-fp32")
        export_fp32(Path(tmp))
        results = {}
        for side in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", tmp, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[0][7:])
    o, q = results["ours"], results["peft"]
    print(f"\nQLoRA NF4+DQ, r=16 all-linear, {args.steps} steps, batch {args.batch_size}, seq {args.seq_len}, "
          f"{args.threads} threads, CPU fp32, SmolLM2-135M")
    print(f"{'':<16}{'qlora-rt':>12}{'PEFT+bnb':>12}{'ratio':>8}")
    for key, label, fmt in (("tokens_per_s", "tokens/s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
                            ("first_loss", "first loss", "{:.4f}"), ("last_loss", "last loss", "{:.4f}")):
        print(f"{label:<16}{fmt.format(o[key]):>12}{fmt.format(q[key]):>12}{o[key] / q[key]:>8.2f}")


if __name__ == "__main__":
    main()
