"""The own int4 format against bitsandbytes NF4 on SmolLM2-135M, one run, same task, same settings.

    python bench/int4_vs_nf4.py [--steps 60] [--work runs/int4-vs-nf4]

1. Training, each format in its own process (so peak RSS is its own): tokens/s and peak RSS.
   int4 trains on the GGUF's own Q4_1 bytes; NF4 quantizes the same weights (dequantized) to NF4.
2. Exports: the int4 run adapter-aware int4 (its trained bytes, exact); the NF4 run adapter-aware nf4
   (MatMulBnb4, its trained bytes, exact) and adapter-aware int4 (NF4 requantized to MatMulNBits).
   Each: max |dlogit| vs the trained PyTorch model (export self-check), held-out exact match through
   the torch-free runtime with the adapter active, and decode tokens/s (128-token prompt, 128 new,
   2 threads, its own process; bench/decode.py's timer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "data"
MODEL = "smollm2-135m"


def train_one(fmt: str, steps: int, out: Path) -> dict:
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    t0 = time.perf_counter()
    r = train(TrainConfig(model=MODEL, data=str(DATA / "dates-train.jsonl"), out=str(out), quant=fmt, steps=steps,
                          batch_size=4, seq_len=256, rank=16, alpha=32, lr=1e-3, eval_every=0, checkpoint_every=0,
                          seed=0))
    return {"tokens_per_s": r.tokens_per_s, "peak_memory": r.peak_memory, "seconds": time.perf_counter() - t0}


def score(folder: Path) -> float:
    from qlora_rt.runtime import Model
    from qlora_rt.train.answers import exact_match, prompt_messages, reference_answer
    from qlora_rt.train.text_data import read_examples

    rows = read_examples(DATA / "dates-heldout.jsonl")
    model = Model(folder, threads=2)
    answers = [c.text.strip() for c in model.generate([prompt_messages(r) for r in rows], adapter="default",
                                                      max_new_tokens=12)]
    return exact_match(answers, [reference_answer(r) for r in rows])


def child(args: list[str]) -> None:
    print(json.dumps(train_one(args[0], int(args[1]), Path(args[2]))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "int4-vs-nf4")
    p.add_argument("--train-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_child:
        return child(args.train_child)
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.trained import open_trained

    trained = {}
    for fmt in ("int4", "nf4"):
        run = args.work / f"run-{fmt}"
        if (run / "adapter").exists():
            print(f"{run}: exists, training not re-measured", file=sys.stderr)
            trained[fmt] = None
            continue
        proc = subprocess.run([sys.executable, __file__, "--train-child", fmt, str(args.steps), str(run)],
                              stdout=subprocess.PIPE, text=True, check=True)
        trained[fmt] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for fmt, exports in (("int4", ("int4",)), ("nf4", ("nf4", "int4"))):
        adapter = args.work / f"run-{fmt}" / "adapter"
        held = open_trained(MODEL, adapter)
        for weights in exports:
            folder = args.work / f"onnx-{fmt}-{weights}"
            report = export(ExportConfig(model=MODEL, adapter=str(adapter), out=str(folder), weights=weights,
                                         overwrite=True), held)
            proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--one", "runtime", str(folder)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            *_, tps = json.loads(proc.stdout.strip().splitlines()[-1])  # cold TTFT, warm TTFT, tokens/s
            rows.append((f"{fmt}-trained, adapter-aware {weights}", report["max_abs_logit_diff"],
                         report.get("int4_relative_weight_error_mean"), score(folder), tps))
        del held
    print(f"\n## Training, SmolLM2-135M, {args.steps} steps, batch 4, r=16, all-linear, 2 cores\n")
    print("| base format | train tok/s | peak RSS | wall s (load included) |\n|---|---|---|---|")
    for fmt, r in trained.items():
        print(f"| {fmt} | {r['tokens_per_s']:.1f} | {r['peak_memory']} | {r['seconds']:.0f} |" if r
              else f"| {fmt} | - |")
    print("\n## Exports (adapter active)\n")
    print("| export | max abs dlogit vs PyTorch | requant weight rel. err | held-out exact match | decode tok/s |")
    print("|---|---|---|---|---|")
    for label, diff, err, em, tps in rows:
        print(f"| {label} | {diff:.2e} | {'-' if err is None else f'{100 * err:.2f}%'} | {100 * em:.1f}% | {tps:.1f} |")


if __name__ == "__main__":
    main()
