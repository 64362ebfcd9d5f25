"""Journey 3: offline CPU inference from Python with adapter switching; needs no torch.

    pip install qlora-rt          # onnxruntime, numpy, tokenizers, jinja2
    python examples/offline_inference.py onnx/mine

One session, several adapters: each call picks one (or none = the base) without reloading the model.
"""

import sys
from pathlib import Path

from qlora_rt.runtime import Model

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/onnx-adapter-aware")
if not (folder / "qlora_rt_export.json").is_file():
    sys.exit(f"usage: python examples/offline_inference.py EXPORT_FOLDER  ({folder} is not an export: run "
             "`make demo` to make runs/demo/onnx-adapter-aware, or `qlora-rt export ...`)")
model = Model(folder, threads=2)
question = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\n4th of July 2031"
for adapter in [None, *model.adapter_names]:
    reply = model.generate(question, chat=True, adapter=adapter, max_new_tokens=16)
    print(f"{adapter or 'base':>10}: {reply.text!r}  ({reply.decode_tokens_per_s:.0f} tok/s)")

print("streaming, sampled with a seed: ", end="")
for piece in model.stream("Write one sentence about the sea.", chat=True, temperature=0.7, top_p=0.9, seed=0,
                          max_new_tokens=40):
    print(piece, end="", flush=True)
print()
