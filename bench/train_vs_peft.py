"""qlora-rt training vs PEFT + bitsandbytes + transformers on the same config, in one run.

Every run starts from the same fp32 weights (a bundled GGUF, SmolLM2-135M by default or --model gemma3-270m,
saved once as an HF folder; a model without a chat template trains on the data as prompt and completion),
puts r=16 LoRA (dropout 0.05) on all linear layers, and trains on the same batches in the same order (the
same tokenization and sampler) with AdamW and the same cosine schedule. Each run is its own process, so
peak RSS is its own. The runs:

  qlora-rt int4 / nf4          `train` with its defaults (--dtype auto: bf16 products on a CPU with bf16
                               matrix units)
  qlora-rt int4 / nf4 fp32     the same with --dtype float32 (fp32 products): the reference loss curve
  qlora-rt int4 / nf4 unpacked `--no-packing`: every micro-batch right-padded (the default packs one where that
                               computes 1/8 fewer positions; the same examples a step either way)
  PEFT nf4 fp32 / bf16         transformers + PEFT + bitsandbytes NF4 + double quant, bnb_4bit_compute_dtype
                               float32 / bfloat16 (PEFT at its own best on this CPU)
  TRL nf4 bf16 padding-free    TRL's SFTTrainer (`pip install trl`) on PEFT's bf16 model: padding_free=True
  TRL nf4 bf16 packed          ... packing=True (rows of seq-len: more tokens a step); see run_trl

    python bench/train_vs_peft.py [--model smollm2-135m] [--steps 30] [--batch-size 4] [--seq-len 256]
                                  [--threads 2] [--runs a,b] [--mixed]

--mixed: examples of mixed lengths (1 to 3 of the dates examples joined into one text example, 80-250
tokens), where padding a batch to its longest example computes many empty positions.

Prints tokens/s, peak RSS and first/last loss with each run's ratio to the faster PEFT run, and how far
each qlora-rt curve lies from its fp32 reference (the largest per-step loss difference).
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


def export_fp32(model: str, folder: Path) -> Path:
    """The GGUF as an fp32 HF checkpoint (transformers will not save a GGUF-loaded model itself), and the
    training data: the dates as chat, or as prompt and completion where the tokenizer has no chat template."""
    from qlora_rt.base.load import load
    from qlora_rt.merge import save_merged
    from qlora_rt.train.text_data import read_examples

    loaded = load(model)
    save_merged(loaded.model, loaded.tokenizer, folder)
    if loaded.tokenizer.chat_template is not None:
        return DATA
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"] + "\n",
                                        "completion": r["messages"][1]["content"]}) + "\n"
                            for r in read_examples(DATA)))
    return data


def mixed_lengths(data: Path, out: Path) -> Path:
    """1, 2 or 3 consecutive examples of `data` as one text example each (question and answer lines), in turn."""
    from qlora_rt.train.text_data import read_examples

    def text(r: dict) -> str:
        return (f"{r['messages'][0]['content']}\n{r['messages'][1]['content']}" if "messages" in r
                else r["prompt"] + r["completion"])

    rows, i, k = read_examples(data), 0, 0
    with open(out, "w") as f:
        while i < len(rows):
            n = 1 + k % 3
            f.write(json.dumps({"text": "\n\n".join(text(r) for r in rows[i:i + n])}) + "\n")
            i, k = i + n, k + 1
    return out


def batches(tokenizer, data: str, steps: int, batch_size: int, seq_len: int, seed: int = 0):
    from qlora_rt.train.text_data import Order, collate, load_examples

    examples, _ = load_examples(data, tokenizer, seq_len)
    order = Order(len(examples), seed)
    return [collate([examples[i] for i in order.take(batch_size)], tokenizer.pad_token_id) for _ in range(steps)]


def run_ours(model_dir: str, data: str, steps: int, batch_size: int, seq_len: int, out: str, quant: str,
             dtype: str, packing: bool = False) -> dict:
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    r = train(TrainConfig(model=model_dir, data=data, out=out, steps=steps, batch_size=batch_size,
                          seq_len=seq_len, rank=16, alpha=32, dropout=0.05, targets="all-linear", quant=quant,
                          double_quant=True, dtype=dtype, checkpoint_every=0, eval_every=0, log_every=10,
                          packing=packing))
    losses = [json.loads(l)["loss"] for l in open(Path(out) / "metrics.jsonl") if '"loss"' in l]
    return {"tokens_per_s": r.tokens_per_s, "losses": losses}


def run_peft(model_dir: str, data: str, steps: int, batch_size: int, seq_len: int, compute: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, compute))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                                 dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * steps), steps)  # as qlora-rt
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for batch in batches(tok, data, steps, batch_size, seq_len):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "losses": losses}


def run_trl(model_dir: str, data: str, steps: int, batch_size: int, seq_len: int, packing: bool) -> dict:
    """TRL's SFTTrainer on the PEFT bf16 run's model (NF4 + double quant, bf16 compute), with TRL's own defaults
    but for what makes the runs alike: the same LoRA, optimizer settings, steps, rows a step, maximum length, no
    gradient checkpointing (TRL's default turns it on: slower), no checkpoints saved. packing=False: padding-free
    batches (each step's examples joined into one row, positions restarting: as qlora-rt's packing); True: TRL's
    packing (best-fit decreasing into rows of seq_len: more tokens a step). (TRL refuses a max_length padding-free
    without packing: the examples are shorter than seq_len here.)"""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from qlora_rt.train.text_data import read_examples

    torch.manual_seed(0)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # prompt and completion (TRL's conversational form for the chat rows): its loss on the completion only, as ours
    rows = datasets.Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                       if "messages" in r else r for r in read_examples(data)])
    seen = {"tokens": 0, "losses": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            seen["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            seen["seconds"] = time.perf_counter() - seen["start"]

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                seen["losses"].append(logs["loss"])

    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch_size,
                       max_length=seq_len if packing else None, learning_rate=2e-4, lr_scheduler_type="cosine",
                       warmup_steps=math.ceil(0.03 * steps), max_grad_norm=1.0, weight_decay=0.0, logging_steps=1,
                       save_strategy="no", report_to="none", gradient_checkpointing=False, use_cpu=True,
                       packing=packing, padding_free=not packing, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        seen["tokens"] += int(batch["input_ids"].numel()) if "attention_mask" not in batch \
            else int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {"tokens_per_s": seen["tokens"] / seen["seconds"], "losses": seen["losses"],
            "tokens_per_step": seen["tokens"] / steps, "bf16_autocast": bool(config.bf16)}


RUNS = {  # name: (side, quant or PEFT's compute dtype, qlora-rt's --dtype, --packing)
    "qlora-rt int4": ("ours", "int4", "auto", True), "qlora-rt nf4": ("ours", "nf4", "auto", True),
    "qlora-rt int4 fp32": ("ours", "int4", "float32", True), "qlora-rt nf4 fp32": ("ours", "nf4", "float32", True),
    "qlora-rt int4 unpacked": ("ours", "int4", "auto", False), "qlora-rt nf4 unpacked": ("ours", "nf4", "auto", False),
    "PEFT nf4 fp32": ("peft", "float32", None, False), "PEFT nf4 bf16": ("peft", "bfloat16", None, False),
    "TRL nf4 bf16 padding-free": ("trl", "bfloat16", None, False),
    "TRL nf4 bf16 packed": ("trl", "bfloat16", None, True),
}


def child(args: argparse.Namespace) -> None:
    import torch

    from qlora_rt.train.report import peak_rss_mib

    torch.set_num_threads(args.threads)
    side, what, dtype, packing = RUNS[args.run]
    if side == "ours":
        result = run_ours(args.model_dir, args.data, args.steps, args.batch_size, args.seq_len,
                          tempfile.mkdtemp() + "/run", what, dtype, packing)
    elif side == "trl":
        result = run_trl(args.model_dir, args.data, args.steps, args.batch_size, args.seq_len, packing)
    else:
        result = run_peft(args.model_dir, args.data, args.steps, args.batch_size, args.seq_len, what)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a bundled GGUF name: smollm2-135m, gemma3-270m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    import importlib.util

    default = [r for r in RUNS if RUNS[r][0] != "trl" or importlib.util.find_spec("trl")]  # TRL where installed
    p.add_argument("--runs", default=",".join(default), help=f"comma list among: {', '.join(RUNS)}")
    p.add_argument("--mixed", action="store_true", help="examples of mixed lengths (see above)")
    p.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        return child(args)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        sys.exit(f"--runs: unknown {', '.join(unknown)}; expected among {', '.join(RUNS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = str(Path(tmp) / f"{args.model}-fp32")
        data = export_fp32(args.model, Path(tmp))
        if args.mixed:
            data = mixed_lengths(data, Path(tmp) / "mixed.jsonl")
        for run in runs:
            cmd = [sys.executable, __file__, "--run", run, "--model-dir", tmp, "--data", str(data),
                   "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{run} failed:\n{out.stderr[-3000:]}")
            results[run] = json.loads(line[0][7:])
            per_step = results[run].get("tokens_per_step")
            print(f"{run}: {results[run]['tokens_per_s']:.1f} tokens/s"
                  + (f", {per_step:.0f} tokens a step" if per_step else ""), file=sys.stderr, flush=True)
    peft = [results[r] for r in results if RUNS[r][0] in ("peft", "trl")]
    best = max(peft, key=lambda r: r["tokens_per_s"]) if peft else None
    print(f"\nr=16 all-linear, dropout 0.05, {args.steps} steps, batch {args.batch_size}, seq {args.seq_len}, "
          f"{args.threads} threads, {args.model}, {'mixed lengths' if args.mixed else 'the dates data'}; "
          "ratios to the fastest PEFT or TRL run")
    print("| run | tokens/s | x PEFT | peak RSS MiB | x PEFT | first loss | last loss | max loss diff vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for run, r in results.items():
        ref = results.get(f"{run} fp32") if RUNS[run][2] == "auto" else None
        diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], ref['losses'])):.4f}" if ref else "")
        speed = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}" if best else ""
        mem = f"{r['peak_rss_mib'] / best['peak_rss_mib']:.2f}" if best else ""
        print(f"| {run} | {r['tokens_per_s']:.1f} | {speed} | {r['peak_rss_mib']:.0f} | {mem} | "
              f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {diff} |")


if __name__ == "__main__":
    main()
