"""Decode speed of exported folders: time to first token and decode tokens/s, batch 1, in one run.

    python bench/decode_onnx.py onnx/a onnx/b ... [--prompt-tokens 128] [--new-tokens 128] [--threads 2]

Each folder runs with its adapters/default.onnx_adapter active when it has one (adapter-aware).
Greedy decoding with the KV cache; end-of-sequence is ignored so every run decodes the same count.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(folder: Path, prompt_tokens: int, new_tokens: int, threads: int) -> tuple[float, float]:
    import onnxruntime as ort

    from export.verify import OrtDecoder

    meta = json.loads((folder / "qlora_rt_export.json").read_text())
    adapter = folder / "adapters" / "default.onnx_adapter"
    dec = OrtDecoder(folder, meta, adapter if adapter.exists() else None)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    dec.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(100, meta["vocab"] - 100, (1, prompt_tokens)).astype(np.int64)
    dec.forward(ids[:, :8], 8, None)  # warm-up
    t0 = time.perf_counter()
    out = dec.forward(ids, prompt_tokens, None)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(new_tokens):
        token = np.array([[int(out[0][0, -1].argmax())]], np.int64)
        out = dec.forward(token, prompt_tokens + i + 1, out[1:])
    return ttft, new_tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rows = [(f, *run(f, args.prompt_tokens, args.new_tokens, args.threads)) for f in args.folders]
    base = rows[0][2]
    print(f"\nbatch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} threads")
    print(f"{'export':<44}{'TTFT s':>8}{'decode tok/s':>14}{'ratio':>7}")
    for f, ttft, tps in rows:
        print(f"{str(f):<44}{ttft:>8.3f}{tps:>14.1f}{tps / base:>7.2f}")


if __name__ == "__main__":
    main()
