"""Decode speed of one export folder in onnxruntime-genai (what phones and desktop apps run) and in
qlora-rt's own runtime, base and adapter, in one process, alternating, greedy, one stream.

    python bench/devices.py --export onnx/my-model [--adapter default] [--prompt-tokens 128] [--new 128]
                            [--builder runs/genai-own --merged runs/merged-hf]

Prints a table: runtime x adapter -> decode tok/s (the tokens after the first), and whether the two
runtimes' tokens agree (up to the first end-of-text token). --builder adds onnxruntime-genai decoding its
own builder's int4 graph of the same model with the adapter merged in (`qlora-rt merge` writes the
--merged folder; the builder runs once, `-p int4 -e cpu`): what a genai user gets without qlora-rt's export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from qlora_rt.runtime import Model

TEXT = ("The history of the written date is long: calendars differed from town to town, and merchants who "
        "traded across borders wrote the day, the month and the year in whatever order their clerks preferred. ")


def genai_run(model: og.Model, ids: list[int], new: int, adapters: og.Adapters | None, name: str | None):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    if name is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(np.array([ids], np.int32))
    tokens, t1 = [], None
    while not gen.is_done() and len(tokens) < new:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
        if t1 is None:
            t1 = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--adapter", default="default", help="adapter name under adapters/ (none: base only)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--builder", type=Path, help="genai builder output folder (made from --merged if missing)")
    ap.add_argument("--merged", type=Path, help="the merged Hugging Face folder the builder reads")
    args = ap.parse_args()
    ours = Model(args.export)
    ids = (ours.tokenizer.encode(TEXT * 20, add_special_tokens=False).ids)[: args.prompt_tokens]
    eos = set(json.loads((args.export / "qlora_rt_export.json").read_text())["eos_token_ids"])
    model = og.Model(str(args.export))
    adapters = og.Adapters(model)
    names = [None] + ([args.adapter] if args.adapter != "none" else [])
    for name in names[1:]:
        adapters.load(str(args.export / "adapters" / f"{name}.onnx_adapter"), name)
    own = None
    if args.builder:
        if not (args.builder / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.merged), "-o",
                            str(args.builder), "-p", "int4", "-e", "cpu", "-c", str(args.builder) + "-cache"],
                           check=True)
        own = og.Model(str(args.builder))
    rows = []
    for name in names:
        speeds = {"genai": [], "qlora-rt": []}
        for _ in range(args.repeats):
            g_tokens, g_speed = genai_run(model, ids, args.new, adapters, name)
            c = ours.generate_ids([ids], adapter=name, max_new_tokens=args.new, ignore_eos=True)[0]
            speeds["genai"].append(g_speed)
            speeds["qlora-rt"].append(c.decode_tokens_per_s)
            if own is not None and name is not None:  # its graph has the adapter merged: the adapter's rows only
                speeds.setdefault("builder", []).append(genai_run(own, ids, args.new, None, None)[1])
        cut = next((i + 1 for i, t in enumerate(c.tokens) if t in eos), len(c.tokens))
        same = g_tokens[:cut] == c.tokens[:cut]
        g, q = statistics.median(speeds["genai"]), statistics.median(speeds["qlora-rt"])
        b = statistics.median(speeds["builder"]) if "builder" in speeds else None
        rows.append((name or "(base)", g, q, same, cut, b))
    print(f"| adapter | genai tok/s | qlora-rt tok/s | genai / qlora-rt | tokens equal | genai, own builder's graph "
          f"(adapter merged) tok/s | ours in genai / builder's |  ({args.prompt_tokens} prompt + {args.new} new, "
          f"median of {args.repeats})")
    print("|---|---|---|---|---|---|---|")
    for name, g, q, same, cut, b in rows:
        builder = f"{b:.1f} | {g / b:.2f}" if b else "- | -"
        print(f"| {name} | {g:.1f} | {q:.1f} | {g / q:.2f} | {'yes' if same else 'NO'} ({cut} tokens) | {builder} |")


if __name__ == "__main__":
    main()
