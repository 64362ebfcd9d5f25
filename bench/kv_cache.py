"""The KV cache in fp16 against fp32 (`qlora-rt export --kv-cache`), on SmolLM2-135M: memory, speed, replies.

    python bench/kv_cache.py [--work runs/serve] [--new 64] [--threads N]

Uses `bench/serve.py`'s export (made there if missing: an r16 adapter as `a`, copies `b`, `c`) and makes its
twin with `--kv-cache fp16` beside it (same adapters). Then, for each, in a process of its own so that RSS is
its own: the serving engine (what `qlora-rt serve` runs) with its rows filled, 16 rows x 512 positions
(prompts of ~440 tokens) and 8 rows x 2048 (~1,980), every row decoding --new tokens, greedy, over the base
and adapters a, b, c in turn: RSS after, and decode tokens/s (tokens over the decode steps' time); decode
tokens/s at 1, 8 and 16 streams on ~40-token prompts. And the replies: `Model.generate` on 8 chat prompts x
--new tokens with each cache, greedy: prompts whose tokens are identical, and the largest difference of a
chosen token's log-probability where the two still agree.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

ADAPTERS = [None, "a", "b", "c"]
CHATS = ["Rewrite 5 March 2021 as ISO 8601.", "What is the capital of France?", "Write a haiku about the sea.",
         "Explain what a KV cache is in one paragraph.", "List three prime numbers greater than 50.",
         "Translate 'good morning' into Spanish and French.", "Why is the sky blue?",
         "Give me a short recipe for pancakes."]


def twin(export: Path) -> Path:
    """The same export with an fp16 cache, its adapters copied."""
    out = export.parent / f"{export.name}-kv16"
    if (out / "adapters" / "c.onnx_adapter").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "qlora_rt", "export", "--model", "smollm2-135m", "--adapter",
                    str(export.parent / "run" / "adapter"), "--out", str(out), "--weights", "int4", "--name", "a",
                    "--kv-cache", "fp16"], check=True)
    for name in ("b", "c"):
        shutil.copy(export / "adapters" / f"{name}.onnx_adapter", out / "adapters")
    return out


def load(folder: str, rows: int, capacity: int, prompt_tokens: int, new: int, threads: int) -> dict:
    """One engine, `rows` requests at once (each prompt ~prompt_tokens tokens): decode tok/s and RSS after."""
    from qlora_rt.runtime.batching import Engine, Request
    from qlora_rt.runtime.decoder import Model

    m = Model(folder, threads)
    e = Engine(m, max_batch=rows, max_seq_len=capacity)
    for name in ADAPTERS[1:]:
        e.add_adapter(name, name)
    steps = []
    e.on_step = steps.append
    words = " ".join(f"w{i}" for i in range(prompt_tokens))
    ids = [m.encode(f"{k}: {words}")[:prompt_tokens] for k in range(rows)]
    qs = [queue.Queue() for _ in range(rows)]
    decoded = 0
    for k, q in enumerate(qs):
        e.submit(Request(ids[k], ADAPTERS[k % 4], new, ignore_eos=True), q.put)
    for q in qs:
        while not (ev := q.get(timeout=900)).finish:
            decoded += len(ev.tokens)
        assert ev.finish == "length", ev.error
    status = Path("/proc/self/status").read_text()
    rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024
    e.close()
    # the first token of each row comes from its prompt's run, the others from decode steps
    return {"decode_tok_s": (decoded - rows) / sum(steps), "rss_mib": rss}


def replies(folders: list[str], new: int) -> dict:
    from qlora_rt.runtime.decoder import Model

    runs = []
    for folder in folders:
        m = Model(folder)
        runs.append([m.generate(p, chat=True, adapter=a, max_new_tokens=new, logprobs=0)
                     for p in CHATS for a in (None, "a")])
    same, worst, agree = 0, 0.0, []
    for x, y in zip(*runs):
        n = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), min(len(x.tokens), len(y.tokens)))
        same += x.tokens == y.tokens
        agree.append(n / max(len(x.tokens), 1))
        worst = max([worst] + [abs(p["logprob"] - q["logprob"]) for p, q in zip(x.logprobs[:n], y.logprobs[:n])])
    return {"identical": same, "replies": len(runs[0]), "agreeing_prefix": sum(agree) / len(agree),
            "max_logprob_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/serve")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: json args of load()
    a = ap.parse_args()
    if a.one:
        print(json.dumps(load(**json.loads(a.one))))
        return
    from serve import prepare

    fp32 = prepare(Path(a.work))
    folders = {"fp32": fp32, "fp16": twin(fp32)}
    loads = [("16 rows x 512, full", 16, 512, 440), ("8 rows x 2048, full", 8, 2048, 1980),
             ("1 stream", 1, 512, 40), ("8 streams", 8, 512, 40), ("16 streams", 16, 512, 40)]
    table = {}
    for label, rows, capacity, prompt in loads:
        for kind, folder in folders.items():  # the two caches take turns
            spec = dict(folder=str(folder), rows=rows, capacity=capacity, prompt_tokens=prompt, new=a.new,
                        threads=a.threads)
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True,
                                 capture_output=True, text=True).stdout
            table[(label, kind)] = json.loads(out.strip().splitlines()[-1])
            print(label, kind, table[(label, kind)], file=sys.stderr)
    q = replies([str(folders["fp32"]), str(folders["fp16"])], a.new)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, SmolLM2-135M adapter-aware int4 (int8 "
          f"activations), base + r16 adapters a, b, c in turn, {a.new} new tokens a row, greedy\n")
    print("| load | fp32 cache: decode tok/s | RSS MiB | fp16 cache: decode tok/s | RSS MiB | fp16 / fp32 speed |")
    print("|---|---|---|---|---|---|")
    for label, *_ in loads:
        f, h = table[(label, "fp32")], table[(label, "fp16")]
        print(f"| {label} | {f['decode_tok_s']:.1f} | {f['rss_mib']:.0f} | {h['decode_tok_s']:.1f} | "
              f"{h['rss_mib']:.0f} | {h['decode_tok_s'] / f['decode_tok_s']:.2f} |")
    print(f"\nreplies, fp16 cache against fp32 ({q['replies']} greedy chat replies, base and adapter a): "
          f"{q['identical']} identical, {100 * q['agreeing_prefix']:.1f}% of tokens before the first difference, "
          f"chosen tokens' log-probabilities within {q['max_logprob_diff']:.2e} where they agree")


if __name__ == "__main__":
    main()
