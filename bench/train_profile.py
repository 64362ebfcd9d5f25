"""Where a CPU training step's time goes: torch.profiler over steps of `train` on SmolLM2-135M, with
bench/train_vs_peft.py's config (r16 all-linear, batch 4 x seq 256), after two steps of warm-up.

    python bench/train_profile.py [--quant int4|nf4] [--dropout 0.05] [--active 3] [--threads 2] [--rows 20]

Prints the operators by self CPU time (what the step spends its time in, kernels and Python glue alike)
and the share of the step the top ones take.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_rt.config import TrainConfig  # noqa: E402
from qlora_rt.train.run import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4", choices=("int4", "nf4"))
    ap.add_argument("--active", type=int, default=3, help="steps profiled (after 2 of warm-up)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (train's default: 0.05)")
    ap.add_argument("--dtype", default="auto", help="train's --dtype (auto: float32 on the CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    times: list[float] = []
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=a.active, repeat=1)
    with tempfile.TemporaryDirectory() as tmp, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule) as prof:
        last = [time.perf_counter()]

        def step(record):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            prof.step()
        train(TrainConfig(model="smollm2-135m", data=str(ROOT / "examples/data/dates-train.jsonl"),
                          out=str(Path(tmp) / "run"), quant=a.quant, steps=2 + a.active, rank=16,
                          batch_size=a.batch_size, seq_len=a.seq_len, lr=2e-4, dropout=a.dropout, dtype=a.dtype,
                          checkpoint_every=0, eval_every=0),
              on_step=step)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"{a.quant}, {a.dtype}, dropout {a.dropout:g}, batch {a.batch_size} x {a.seq_len}, {a.threads} threads: "
          f"{a.active} profiled steps, "
          f"{sum(times[2:]) / max(len(times) - 2, 1):.2f} s a step (unprofiled steps "
          f"{' / '.join(f'{t:.2f}' for t in times[:2])} s)\n")
    print("| operator | self CPU s a step | share | calls a step |")
    print("|---|---|---|---|")
    rows = sorted(averages, key=lambda e: -e.self_cpu_time_total)[: a.rows]
    for e in rows:
        share = 100 * e.self_cpu_time_total / total
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6 / a.active:.3f} | {share:.1f}% | {e.count // a.active} |")
    top = sum(e.self_cpu_time_total for e in rows)
    print(f"\nthe top {len(rows)} take {100 * top / total:.0f}% of the profiled self time "
          f"({total / 1e6 / a.active:.2f} s a step)")


if __name__ == "__main__":
    main()
