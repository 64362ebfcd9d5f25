"""1 vs 2 training processes (torch.distributed DDP, and FSDP2 with `--fsdp`; gloo on the CPU) on SmolLM2-135M:
tokens/s, peak RSS of the largest process, what each process holds, and the bytes sent per optimizer step
(DDP: the adapter's gradients only; FSDP: the weights gathered for each forward and backward too).

    python bench/distributed.py [--steps 12] [--batch 4]

Both runs train on the same global batch (1 x batch B vs 2 x batch B/2) of the demo's date data, nf4 base,
r16 all-linear. On a 2-core machine expect no speed-up: the two processes share the same two cores
(each gets one thread), and the point of the table is what several processes cost, not what they gain.
Peak RSS includes loading: every process builds the whole 4-bit model in host memory before FSDP shards
it (FSDP's saving is in what each process keeps, on a GPU its memory).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_rt.train.report import table  # noqa: E402


def run(nproc: int, batch: int, steps: int, out: Path, fsdp: bool = False) -> dict:
    data = REPO / "examples" / "data" / "dates-train.jsonl"
    cmd = [sys.executable, "-m", "qlora_rt", "train", "--model", "smollm2-135m", "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(batch // nproc), "--seq-len", "256", "--checkpoint-every", "0",
           "--eval-every", "0", "--nproc", str(nproc), *(["--fsdp"] if fsdp else [])]
    # a fresh parent per run: its children's ru_maxrss is then this run's largest process (KiB)
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], check=True, capture_output=True, "
             "text=True); print(p.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    said = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, cwd=REPO, capture_output=True,
                          text=True).stdout
    peak = int(said.split()[-1])
    held = re.search(r"FSDP: (\d+)% of the ([\d,.]+) MiB of weights on each", said)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    grads = (out / "adapter" / "adapter_model.safetensors").stat().st_size  # fp32 A and B: what DDP all-reduces
    return {"tokens_per_s": last["tokens_per_s"], "peak_gib": peak / 2**20, "loss": last["loss"],
            "allreduce_bytes": grads if nproc > 1 else 0,
            "held": (int(held[1]), float(held[2].replace(",", ""))) if held else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over the processes)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.batch, args.steps, Path(tmp) / "one")
        two = run(2, args.batch, args.steps, Path(tmp) / "two")
        sharded = run(2, args.batch, args.steps, Path(tmp) / "fsdp", fsdp=True)
    share, weights = sharded["held"]
    adapter = two["allreduce_bytes"] / 2**20
    print(table(f"SmolLM2-135M, nf4, r16 all-linear, global batch {args.batch}, {args.steps} steps", [
        ("1 process", f"{one['tokens_per_s']:,.0f} tok/s, peak RSS {one['peak_gib']:.2f} GiB, final loss "
                      f"{one['loss']:.4f}"),
        ("2 processes (gloo)", f"{two['tokens_per_s']:,.0f} tok/s in all "
                               f"({two['tokens_per_s'] / one['tokens_per_s']:.2f}x), peak RSS of the largest "
                               f"process {two['peak_gib']:.2f} GiB, final loss {two['loss']:.4f}"),
        ("all-reduced per step", f"{adapter:.1f} MiB (the adapter's fp32 gradients; the 4-bit base is never sent)"),
        ("2 processes, --fsdp", f"{sharded['tokens_per_s']:,.0f} tok/s in all "
                                f"({sharded['tokens_per_s'] / one['tokens_per_s']:.2f}x), peak RSS of the largest "
                                f"process {sharded['peak_gib']:.2f} GiB, final loss {sharded['loss']:.4f}"),
        ("held by each process", f"{share}% of the {weights:,.1f} MiB of weights (4-bit base, fp32 embeddings and "
                                 "adapters); per-block 4-bit statistics whole"),
        ("sent per micro-batch", f"at most {weights:,.0f} MiB gathered by each process (its peer's half of the weights "
                                 "for the forward, of the blocks' again for the backward), and the adapter's "
                                 f"{adapter:.1f} MiB of gradients reduce-scattered"),
    ]))


if __name__ == "__main__":
    main()
