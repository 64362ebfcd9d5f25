"""onnxruntime's fused encoder ops vs the same arithmetic in standard ONNX ops, on all-MiniLM-L6-v2.

    python bench/encoder_ops.py [--rounds 3]

A short classifier run (the committed real sentiment sample), then merged fp32 and adapter-aware NF4
exports built twice: fused (com.microsoft.MultiHeadAttention, SkipLayerNormalization, Gelu) and plain
(MatMul/Softmax attention, Add + LayerNormalization, the standard Gelu). Each is timed classifying the
160 held-out texts (batch 32, texts batched by length), rounds alternating, median; both are checked
against PyTorch by the export itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import qlora_rt.export.encoder_graph as encoder  # noqa: E402
from qlora_rt.config import ExportConfig, TrainConfig  # noqa: E402
from qlora_rt.export.exporter import export  # noqa: E402
from qlora_rt.runtime import Classifier  # noqa: E402
from qlora_rt.train.label_data import read  # noqa: E402
from qlora_rt.train.report import table  # noqa: E402
from qlora_rt.train.run import train  # noqa: E402

DATA = REPO / "tests" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    texts = [r["text"] for r in read(DATA / "sentiment-test.jsonl", "--data")[0]]
    with tempfile.TemporaryDirectory() as tmp:
        run = train(TrainConfig(model="all-minilm-l6-v2", data=str(DATA / "sentiment-train.jsonl"), out=f"{tmp}/run",
                                steps=4, batch_size=16, seq_len=128, checkpoint_every=0, eval_every=0))
        folders, diffs = {}, {}
        for mode, weights in (("merged", "fp32"), ("adapter-aware", "nf4")):
            for attention, norm in ((True, True), (False, False), (False, True), (True, False)):
                encoder.FUSED_ATTENTION, encoder.FUSED_NORM = attention, norm
                name = (f"{mode} {weights}, attention {'fused' if attention else 'plain'}, norm+gelu "
                        f"{'fused' if norm else 'plain'}")
                folders[name] = Path(tmp) / name.replace(" ", "-").replace(",", "").replace("+", "")
                report = export(ExportConfig(model="all-minilm-l6-v2", adapter=str(run.adapter), out=str(folders[name]),
                                             mode=mode, weights=weights))
                diffs[name] = report["max_abs_logit_diff"]
        encoder.FUSED_ATTENTION, encoder.FUSED_NORM = True, True
        times: dict[str, list[float]] = {n: [] for n in folders}
        models = {n: Classifier(f) for n, f in folders.items()}
        for _ in range(args.rounds):
            for name, clf in models.items():
                t0 = time.perf_counter()
                clf.classify(texts)
                times[name].append(time.perf_counter() - t0)
    rows = [(name, f"{len(texts) / statistics.median(t):,.0f} texts/s, max |dlogit| vs PyTorch {diffs[name]:.1e}")
            for name, t in times.items()]
    print(table(f"all-MiniLM-L6-v2 classifier, {len(texts)} texts, median of {args.rounds} rounds", rows))


if __name__ == "__main__":
    main()
