"""Sentiment classification at the same budget: qlora-rt against PEFT + bitsandbytes, several seeds, one run.

    python bench/classify_vs_peft.py [--seeds 0,1,2,3,4] [--train 2000] [--work runs/classify-vs-peft]
                                     [--sides peft,peft-bf16,ours,ours-defaults]

Data: examples/make_sentiment.py's split of real human-rated texts (Amazon review snippets and tweets),
its 1,000 test texts, and the first --train of its training texts. Model: the bundled all-MiniLM-L6-v2.
The budget, the same for both: 3 epochs, batch 32, lr 5e-4, LoRA r16 / alpha 32 / dropout 0 on all
linears, NF4 + double quantization, the head trained in full, max length 96.
- PEFT: `AutoModelForSequenceClassification` loaded 4-bit by bitsandbytes, `get_peft_model(SEQ_CLS,
  target_modules="all-linear", modules_to_save=["classifier"])`, torch AdamW (its default weight decay
  0.01), 10 warm-up steps then linear decay: PEFT's usual recipe; with bnb_4bit_compute_dtype float32 (peft)
  or bfloat16 (peft-bf16).
- qlora-rt: `qlora-rt train --task classify` with the same flags (its own schedule and defaults otherwise),
  and with no flags but --model/--data (what a user gets).
Each run is its own process (peak RSS is its own). Prints mean ± standard deviation over the seeds of test
accuracy and macro-F1, training tokens/s (non-padding tokens) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = dict(epochs=3, batch_size=32, lr=5e-4, rank=16, alpha=32, dropout=0.0, max_length=96)


def data(work: Path, n_train: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "examples"))
    import make_sentiment

    full_train, test = make_sentiment.main(["--out", str(work / "data")])
    train = work / "data" / f"train-{n_train}.jsonl"
    train.write_text("".join(full_train.read_text().splitlines(keepends=True)[:n_train]))
    return train, test


def timed(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    p = subprocess.run([*timer, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{p.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p, int(rss.group(1)) / 2**20 if rss else float("nan")


def run_ours(train: Path, test: Path, out: Path, seed: int, defaults: bool) -> dict:
    args = [sys.executable, "-m", "qlora_rt", "train", "--model", "all-minilm-l6-v2", "--data", str(train),
            "--eval-data", str(test), "--out", str(out), "--seed", str(seed), "--eval-every", "0",
            "--checkpoint-every", "0"]
    if not defaults:
        args += ["--epochs", str(BUDGET["epochs"]), "--batch-size", str(BUDGET["batch_size"]), "--lr",
                 str(BUDGET["lr"]), "--rank", str(BUDGET["rank"]), "--alpha", str(BUDGET["alpha"]), "--dropout",
                 str(BUDGET["dropout"]), "--targets", "all-linear",
                 "--quant", "nf4", "--seq-len", str(BUDGET["max_length"])]
    p, rss = timed(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_accuracy" in r][-1]
    tps = re.search(r"tokens/s\s+([\d,]+)", p.stderr)
    return {"accuracy": final["eval_accuracy"], "macro_f1": final["eval_macro_f1"],
            "tokens_per_s": float(tps.group(1).replace(",", "")) if tps else float("nan"), "rss_gib": rss}


PEFT_RUN = r'''
import json, random, sys, time
import numpy as np, torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                          get_linear_schedule_with_warmup)
from qlora_rt.base.load import resolve

train_path, test_path, seed, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
compute = getattr(torch, sys.argv[5])
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
rows = [json.loads(l) for l in open(train_path)]
test = [json.loads(l) for l in open(test_path)]
labels = sorted({r["label"] for r in rows})
folder = resolve("all-minilm-l6-v2")
tok = AutoTokenizer.from_pretrained(folder)
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["classifier"])
model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels), quantization_config=bnb,
                                                           id2label=dict(enumerate(labels)), device_map={"": "cpu"})
model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=budget["rank"], lora_alpha=budget["alpha"],
                                         lora_dropout=budget["dropout"], target_modules="all-linear",
                                         modules_to_save=["classifier"]))
def batch(part):
    enc = tok([r["text"] for r in part], truncation=True, max_length=budget["max_length"], padding=True,
              return_tensors="pt")
    enc["labels"] = torch.tensor([labels.index(r["label"]) for r in part])
    return enc
steps_per_epoch = (len(rows) + budget["batch_size"] - 1) // budget["batch_size"]
total = steps_per_epoch * budget["epochs"]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget["lr"])
sched = get_linear_schedule_with_warmup(opt, 10, total)
g = torch.Generator().manual_seed(seed)
model.train()
tokens, t0 = 0, time.perf_counter()
for epoch in range(budget["epochs"]):
    order = torch.randperm(len(rows), generator=g).tolist()
    for k in range(0, len(order), budget["batch_size"]):
        b = batch([rows[i] for i in order[k:k + budget["batch_size"]]])
        tokens += int(b["attention_mask"].sum())
        loss = model(**b).loss
        loss.backward()
        opt.step(); sched.step(); opt.zero_grad()
elapsed = time.perf_counter() - t0
model.eval()
pred = []
with torch.no_grad():
    for k in range(0, len(test), 64):
        pred += model(**{kk: v for kk, v in batch(test[k:k + 64]).items() if kk != "labels"}).logits.argmax(-1).tolist()
truth = [labels.index(r["label"]) for r in test]
acc = sum(p == t for p, t in zip(pred, truth)) / len(truth)
f1s = []
for c in range(len(labels)):
    tp = sum(p == c and t == c for p, t in zip(pred, truth))
    denom = sum(p == c for p in pred) + sum(t == c for t in truth)
    f1s.append(2 * tp / denom if denom else 0.0)
print(json.dumps({"accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "tokens_per_s": tokens / elapsed}))
'''


def run_peft(train: Path, test: Path, seed: int, compute: str = "float32") -> dict:
    p, rss = timed([sys.executable, "-c", PEFT_RUN, str(train), str(test), str(seed), json.dumps(BUDGET), compute])
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "rss_gib": rss}


def summary(name: str, runs: list[dict]) -> str:
    def ms(key, scale=1.0, fmt="{:.1f}"):
        values = [r[key] * scale for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"
    per_seed = ", ".join(f"{100 * r['accuracy']:.1f}" for r in runs)
    return (f"| {name} | {ms('accuracy', 100)} | {ms('macro_f1', 100)} | {ms('tokens_per_s', 1, '{:.0f}')} | "
            f"{ms('rss_gib', 1, '{:.2f}')} | {per_seed} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--work", default="runs/classify-vs-peft")
    ap.add_argument("--sides", default="peft,peft-bf16,ours,ours-defaults")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = data(work, a.train)
    seeds = [int(s) for s in a.seeds.split(",")]
    sides = a.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for seed in seeds:
        for side in sides:
            t0 = time.perf_counter()
            if side in ("peft", "peft-bf16"):
                r = run_peft(train, test, seed, "bfloat16" if side == "peft-bf16" else "float32")
            else:
                out = work / f"{side}-{seed}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                r = run_ours(train, test, out, seed, defaults=side == "ours-defaults")
            results[side].append(r)
            print(f"seed {seed} {side:14s} accuracy {100 * r['accuracy']:.1f}%  macro-F1 {100 * r['macro_f1']:.1f}%  "
                  f"{r['tokens_per_s']:.0f} tok/s  {r['rss_gib']:.2f} GiB  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    names = {"peft": "PEFT + bitsandbytes (same budget)",
             "peft-bf16": "PEFT, bnb_4bit_compute_dtype bf16", "ours": "qlora-rt (same budget)",
             "ours-defaults": "qlora-rt defaults (no flags)"}
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, all-MiniLM-L6-v2, {a.train} train / 1000 "
          f"test texts, seeds {a.seeds}\n")
    print("| recipe | accuracy % | macro-F1 % | train tokens/s | peak RSS GiB | per seed |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        print(summary(names[side], results[side]))


if __name__ == "__main__":
    main()
