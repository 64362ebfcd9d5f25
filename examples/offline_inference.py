"""Journey 3: offline CPU inference from Python with adapter switching; needs no torch.

    pip install qlora-rt          # onnxruntime, numpy, tokenizers, jinja2
    python examples/offline_inference.py onnx/mine

One session, several adapters: each call picks one (or none = the base) without reloading the model.
"""

import sys

from qlora_rt.runtime import Model

model = Model(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/onnx-adapter-aware", threads=2)
question = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\n4th of July 2031"
for adapter in [None, *model.adapter_names]:
    reply = model.generate(question, chat=True, adapter=adapter, max_new_tokens=16)
    print(f"{adapter or 'base':>10}: {reply.text!r}  ({reply.decode_tokens_per_s:.0f} tok/s)")

print("streaming, sampled with a seed: ", end="")
for piece in model.stream("Write one sentence about the sea.", chat=True, temperature=0.7, top_p=0.9, seed=0,
                          max_new_tokens=40):
    print(piece, end="", flush=True)
print()
