"""The encoder job, end to end: a 4-bit all-MiniLM-L6-v2 sentiment classifier on real reviews and tweets, CPU only.

1. data: Hutto & Gilbert's human-rated Amazon snippets and tweets (examples/make_sentiment.py), split with
   a seed: ~5.4k train, 1000 held out;
2. train r=16 LoRA on every Linear of the NF4 base, the classification head and pooler in full;
3. export twice: adapter-aware NF4 (the trained bytes; the head, LoRA and label names in
   adapters/sentiment.onnx_adapter) and merged int4 (folded in and requantized), each verified;
4. classify the held-out texts with the torch-free runtime and print accuracy, macro-F1 and speed of each,
   next to PyTorch's.

    python examples/sentiment.py [--steps 200] [--out runs/sentiment]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_sentiment import main as make_sentiment  # noqa: E402

from qlora_rt.config import ExportConfig, TrainConfig  # noqa: E402
from qlora_rt.export.exporter import export  # noqa: E402
from qlora_rt.runtime import Classifier  # noqa: E402
from qlora_rt.train.label_data import read  # noqa: E402
from qlora_rt.train.report import table  # noqa: E402
from qlora_rt.train.run import train  # noqa: E402
from qlora_rt.train.tasks import confusion_table, scores  # noqa: E402

DATA = HERE / "data"
MODEL = "all-minilm-l6-v2"


def score(labels: list[str], truth: list[str], pred: list[str]) -> dict:
    ids = {l: i for i, l in enumerate(labels)}
    return scores([ids[t] for t in truth], [ids[p] for p in pred], len(labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="runs/sentiment")
    p.add_argument("--sdist", type=Path, help="vaderSentiment-3.3.2.tar.gz, if already downloaded")
    args = p.parse_args()
    out = Path(args.out)
    train_file, test_file = DATA / "sentiment-train.jsonl", DATA / "sentiment-test.jsonl"
    if not test_file.exists():
        make_sentiment(["--sdist", str(args.sdist)] if args.sdist else [])
    if out.exists():
        print(f"removing the previous run in {out}", file=sys.stderr)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = train(TrainConfig(model=MODEL, data=str(train_file), eval_data=str(test_file), out=str(out / "run"),
                               steps=args.steps, batch_size=16, lr=1e-3, seq_len=128, rank=16, eval_every=0,
                               checkpoint_every=100, quant="nf4"))
    train_s = time.perf_counter() - t0
    exports = {"adapter-aware nf4": ("adapter-aware", "nf4"), "merged int4": ("merged", "int4")}
    reports = {}
    for name, (mode, weights) in exports.items():
        reports[name] = export(ExportConfig(model=MODEL, adapter=str(result.adapter),
                                            out=str(out / name.replace(" ", "-")),
                                            mode=mode, weights=weights, name="sentiment"))
    rows = read(test_file, "--data")[0]
    texts, truth = [r["text"] for r in rows], [r["label"] for r in rows]
    lines = [("held-out texts", f"{len(rows)} ({100 * truth.count('positive') / len(rows):.1f}% positive)"),
             ("training", f"{result.steps} steps, {train_s:.0f} s, {result.peak_memory}")]
    start = result.eval_metrics  # PyTorch, at the end of training, on the same texts
    lines.append(("PyTorch (4-bit base + adapter)", f"accuracy {100 * start['eval_accuracy']:.1f}%, macro-F1 "
                                                   f"{100 * start['eval_macro_f1']:.1f}%"))
    for name in exports:
        clf = Classifier(out / name.replace(" ", "-"))
        t = time.perf_counter()
        preds = [x.label for x in clf.classify(texts)]
        speed = len(texts) / (time.perf_counter() - t)
        s = score(clf.labels(), truth, preds)
        size = sum(v for k, v in reports[name]["files_bytes"].items() if k.startswith("model.onnx")) / 2**20
        lines.append((f"onnxruntime, {name}", f"accuracy {100 * s['eval_accuracy']:.1f}%, macro-F1 "
                                              f"{100 * s['eval_macro_f1']:.1f}%, {speed:,.0f} texts/s, "
                                              f"{size:,.1f} MiB, max |dlogit| "
                                              f"{reports[name]['max_abs_logit_diff']:.1e}"))
        if name == "adapter-aware nf4":
            confusion = confusion_table(s["eval_confusion"], clf.labels())
    lines.append(("total time", f"{time.perf_counter() - t0:.0f} s"))
    print(table("sentiment: all-MiniLM-L6-v2, NF4 base + r16 LoRA, held-out accuracy", lines))
    print(f"\nadapter-aware export, held-out confusion matrix\n{confusion}")


if __name__ == "__main__":
    main()
