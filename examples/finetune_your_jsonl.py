"""Journey 1: fine-tune the bundled SmolLM2-135M on your own JSONL, on the CPU or one GPU.

    python examples/finetune_your_jsonl.py my-train.jsonl [my-eval.jsonl] [--steps 100] [--out runs/mine]

Each line is {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} (chat; the loss is
on the assistant turns). The base is frozen in int4 (the GGUF's own Q4_1 weights); the adapter lands in
OUT/adapter in PEFT's layout. The same as:
    qlora-rt train --model smollm2-135m --data my-train.jsonl --quant int4 --out runs/mine --steps 100
"""

import argparse

from qlora_rt.config import TrainConfig
from qlora_rt.train.run import train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("data")
p.add_argument("eval_data", nargs="?")
p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file, or smollm2-135m")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--out", default="runs/mine")
args = p.parse_args()

result = train(TrainConfig(model=args.model, data=args.data, eval_data=args.eval_data, out=args.out, quant="int4",
                           steps=args.steps, batch_size=4, seq_len=512, rank=16, alpha=32))
evaluated = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
print(f"adapter: {result.adapter}  (final loss {result.train_loss:.4f}{evaluated})")
