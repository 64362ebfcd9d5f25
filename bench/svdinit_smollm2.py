"""PiSSA and LoftQ on SmolLM2-135M: how close each init starts to W, and where the same training ends.

    python bench/svdinit_smollm2.py [--quant nf4] [--ranks 16 64] [--steps 20]

W is the bundled GGUF's dequantized Q4_1 weight: the only full-precision weight there is offline.
(Quantizing it to int4 block 32 gives back W exactly, so the comparison is made in NF4, where
quantization does lose something.)

1. Per-layer relative reconstruction error ‖deq(Q) + s·B·A − W‖ / ‖W‖ over the 210 decoder Linears,
   mean (and max), for default / LoftQ(1) / LoftQ(5) / PiSSA at each rank, with the init's time.
2. Held-out loss on the demo task (examples/data/dates-*.jsonl) before training and after --steps steps
   for each init, same seed, same data, rank 16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_rt import quant  # noqa: E402
from qlora_rt.base.linears import linear_names  # noqa: E402
from qlora_rt.base.load import load  # noqa: E402
from qlora_rt.config import TrainConfig  # noqa: E402
from qlora_rt.lora.layers import LoraConfig  # noqa: E402
from qlora_rt.lora.svd_init import InitConfig, relative_error, split  # noqa: E402
from qlora_rt.train.run import train  # noqa: E402

DATA = ROOT / "examples" / "data"
INITS = [InitConfig("default"), InitConfig("loftq", 1), InitConfig("loftq", 5), InitConfig("pissa")]
CPU = torch.device("cpu")


def reconstruction(qcfg: quant.QuantConfig, ranks: list[int]) -> None:
    model = load("smollm2-135m").model
    weights = {n: model.get_submodule(n).weight.detach().float() for n in linear_names(model)}
    print(f"\n## Reconstruction error, {len(weights)} Linears, {qcfg.format} (mean / max over layers)\n")
    print("| rank | init | mean rel. error | max rel. error | init time (s) |\n|---|---|---|---|---|")
    for rank in ranks:
        scale = LoraConfig(rank=rank, alpha=2 * rank).scale()
        for cfg in INITS:
            t0, errors = time.perf_counter(), []
            for W in weights.values():
                if cfg.method == "default":
                    errors.append(relative_error(W, quant.quantize(W, qcfg, CPU)))
                else:
                    base, A, B = split(W, qcfg, rank, scale, cfg, CPU)
                    errors.append(relative_error(W, base, A, B, scale))
            print(f"| {rank} | {cfg.describe()} | {100 * sum(errors) / len(errors):.3f}% | {100 * max(errors):.3f}% "
                  f"| {time.perf_counter() - t0:.1f} |", flush=True)


def training(quant_format: str, steps: int, rank: int) -> None:
    print(f"\n## Held-out loss, demo task, {quant_format} r={rank}, {steps} steps, seed 0\n")
    print("| init | eval loss at start | eval loss after | train tok/s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in INITS:
            out = Path(tmp) / cfg.describe()
            r = train(TrainConfig(model="smollm2-135m", data=str(DATA / "dates-train.jsonl"),
                                  eval_data=str(DATA / "dates-heldout.jsonl"), out=str(out), quant=quant_format,
                                  init=cfg.method, loftq_iters=cfg.loftq_iters, steps=steps, batch_size=4,
                                  seq_len=256, rank=rank, alpha=2 * rank, lr=1e-3, eval_every=0,
                                  checkpoint_every=0, seed=0))
            start = next(json.loads(l)["eval_loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                         if '"eval_loss"' in l)
            print(f"| {cfg.describe()} | {start:.4f} | {r.eval_loss:.4f} | {r.tokens_per_s:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int4"))
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    reconstruction(quant.QuantConfig(args.quant), args.ranks)
    if not args.skip_training:
        training(args.quant, args.steps, 16)


if __name__ == "__main__":
    main()
