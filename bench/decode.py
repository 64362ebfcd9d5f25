"""Decode speed on SmolLM2-135M, every engine in one run: time to first token and decode tokens/s.

    python bench/decode.py [--adapter RUN/adapter] [--work runs/bench] [--prompt-tokens 128]
                           [--new-tokens 128] [--threads 2] [--rounds 3]

Engines (batch 1, greedy, end-of-sequence ignored so each decodes the same count, each in its own
process so thread pools do not interfere):
  qlora-rt runtime on the adapter-aware int4 export of an int4 run (`--quant int4 --gguf-q4-1 round
    --quant-head`: the trained bytes, exact), adapter active
  qlora-rt runtime on the adapter-aware int4 export of the nf4 run (requantized, int8 activations), adapter active
  qlora-rt runtime on the merged int4 export
  qlora-rt runtime on the adapter-aware nf4 export (MatMulBnb4), adapter active
  PyTorch eager fp32 (transformers, KV cache), the merged model
  onnxruntime-genai's own int4 build of the same weights (`onnxruntime_genai.models.builder -p int4 -e cpu`)
This machine's speed drifts by ±20% over minutes, so the engines take turns for --rounds rounds and
the table gives each one's median. Each process times a user's first prompt (no warm-up: what one
`qlora-rt generate` call sees, session start-up excluded) and then the same prompt again; decode
tokens/s are the second run's. Missing exports are built first (and a short training run, if no
--adapter is given). The genai build needs `pip install onnxruntime-genai onnx_ir`.

The physical limit: a decode step of batch 1 reads every weight it multiplies by once (the embedding
table one row; an active adapter's LoRA matrices instead of the graph's placeholders) plus the KV cache
at its mean length, so tokens/s cannot exceed the machine's read bandwidth / those bytes. The bench
measures the bandwidth (a sum over 1 GiB with --threads threads, best of 5) and gives each engine's
bytes read per token, that ceiling and the fraction of it reached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {  # label: (kind, export mode, weights); "exact" is the int4-trained run's adapter-aware export
    "qlora-rt adapter-aware int4 exact + adapter": ("runtime", "adapter-aware", "exact"),
    "qlora-rt adapter-aware int4 + adapter": ("runtime", "adapter-aware", "int4"),
    "qlora-rt merged int4": ("runtime", "merged", "int4"),
    "qlora-rt adapter-aware nf4 + adapter": ("runtime", "adapter-aware", "nf4"),
    "PyTorch eager fp32 (merged)": ("torch", None, None),
    "onnxruntime-genai int4": ("genai", None, None),
}


def prompt_ids(n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, 49000, n).tolist()


def time_runtime(folder: Path, ids: list[int], new: int, threads: int) -> tuple[float, float, float]:
    from qlora_rt.runtime import Model

    model = Model(folder, threads=threads)
    adapter = "default" if "default" in model.adapter_names else None
    cold = model.generate_ids([ids], adapter=adapter, max_new_tokens=new, ignore_eos=True)[0]  # a user's first prompt
    warm = model.generate_ids([ids], adapter=adapter, max_new_tokens=new, ignore_eos=True)[0]
    return cold.ttft_s, warm.ttft_s, warm.decode_tokens_per_s


def time_torch(merged: Path, ids: list[int], new: int, threads: int) -> tuple[float, float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(x: torch.Tensor, n: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return t1 - t0, (n - 1) / (time.perf_counter() - t1)

    cold = run(torch.tensor([ids]), new)
    warm = run(torch.tensor([ids]), new)
    return cold[0], *warm


def time_genai(folder: Path, ids: list[int], new: int, threads: int) -> tuple[float, float, float]:
    import onnxruntime_genai as og

    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(folder))

    def run(prompt: list[int], n: int) -> tuple[float, float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens([prompt])  # the prompt's forward pass
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        return t1 - t0, (n - 1) / (time.perf_counter() - t1)

    cold = run(ids, new)
    warm = run(ids, new)
    return cold[0], *warm


def read_bandwidth(threads: int) -> float:
    """Bytes/s this machine reads from memory with `threads` threads: a sum over 1 GiB, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)  # 1 GiB of fp32, far beyond any cache
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best


def kv_bytes_per_position(graph, folder: Path) -> int:
    """Bytes of KV cache one position adds: past inputs shaped (batch, kv_heads, seq, head_dim); a head_dim
    the graph leaves symbolic (onnxruntime-genai's) from the folder's genai_config.json."""
    import onnx

    total = 0
    for i in graph.input:
        if i.name.startswith("past"):
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            if not dims[3]:
                dims[3] = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
            total += dims[1] * dims[3] * itemsize
    return total


def onnx_bytes_per_token(folder: Path, context: int) -> int:
    """Bytes one decode step of an ONNX decoder reads: its initializers (a Gather's table: one row; an
    active adapter's parameters in place of the placeholders they override) plus the KV cache."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else onnx.numpy_helper.to_array(t).nbytes
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in sizes and len(dims[node.input[0]]) == 2:
            sizes[node.input[0]] //= dims[node.input[0]][0]  # one row a token
    adapter = folder / "adapters" / "default.onnx_adapter"
    if adapter.exists():
        for name, value in ort.AdapterFormat.read_adapter(str(adapter)).get_parameters().items():
            sizes[name] = value.numpy().nbytes
    return sum(sizes.values()) + context * kv_bytes_per_position(model.graph, folder)


def torch_bytes_per_token(merged: Path, context: int) -> int:
    """The merged fp32 checkpoint read whole (its head is the tied embedding table), plus the KV cache."""
    from safetensors import safe_open
    from transformers import AutoConfig

    total = 0
    for f in merged.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                total += int(np.prod(sl.get_shape())) * 4  # computed in fp32
    cfg = AutoConfig.from_pretrained(merged)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    return total + context * kv


def prepare(work: Path, adapter: Path | None) -> dict[str, Path]:
    """Build whatever is missing: adapter, exports, merged HF checkpoint, genai int4 folder."""
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export

    if adapter is None:
        adapter = work / "run" / "adapter"
        if not adapter.exists():
            from qlora_rt.train.run import train

            train(TrainConfig(model="smollm2-135m", data=str(ROOT / "examples/data/dates-train.jsonl"),
                              out=str(work / "run"), steps=10, batch_size=4, seq_len=256, lr=1e-3,
                              checkpoint_every=0, eval_every=0))
    exact = work / "run-int4" / "adapter"  # the demo's base: the fast exact path (README, "Decode speed")
    if not exact.exists():
        from qlora_rt.train.run import train

        train(TrainConfig(model="smollm2-135m", data=str(ROOT / "examples/data/dates-train.jsonl"),
                          out=str(work / "run-int4"), quant="int4", gguf="int4", quant_head=True, steps=10,
                          batch_size=4, seq_len=256, lr=1e-3, checkpoint_every=0, eval_every=0))
    paths = {}
    for label, (kind, mode, weights) in ENGINES.items():
        if kind == "runtime":
            paths[label] = work / f"onnx-{mode}-{weights}"
            if not (paths[label] / "model.onnx").exists():
                export(ExportConfig(model="smollm2-135m", adapter=str(exact if weights == "exact" else adapter),
                                    out=str(paths[label]), mode=mode,
                                    weights="int4" if weights == "exact" else weights))
    merged = paths["PyTorch eager fp32 (merged)"] = work / "merged-fp32"
    if not (merged / "config.json").exists():
        from qlora_rt.merge import merge

        merge("smollm2-135m", str(adapter), str(merged))
    genai = paths["onnxruntime-genai int4"] = work / "genai-int4"
    if not (genai / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(genai),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", type=Path, help="trained adapter folder (default: a 10-step run is made)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="engines take turns this many times; medians reported")
    p.add_argument("--one", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    ids = prompt_ids(args.prompt_tokens)
    if args.one:
        kind, path = args.one
        timer = {"runtime": time_runtime, "torch": time_torch, "genai": time_genai}[kind]
        print(json.dumps(timer(Path(path), ids, args.new_tokens, args.threads)))
        return
    paths = prepare(args.work, args.adapter)
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in ENGINES}
    for _ in range(args.rounds):
        for label, (kind, _, _) in ENGINES.items():
            proc = subprocess.run([sys.executable, __file__, "--one", kind, str(paths[label]), "--prompt-tokens",
                                   str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--threads",
                                   str(args.threads)], capture_output=True, text=True)
            if proc.returncode:
                print(f"{label}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
                continue
            runs[label].append(tuple(json.loads(proc.stdout.strip().splitlines()[-1])))
    bandwidth = read_bandwidth(args.threads)
    context = args.prompt_tokens + args.new_tokens // 2  # the KV cache's mean length over the decode
    per_token = {label: (torch_bytes_per_token if kind == "torch" else onnx_bytes_per_token)(paths[label], context)
                 for label, (kind, _, _) in ENGINES.items()}
    rows = [(label, *(float(np.median([r[i] for r in rs])) for i in range(3)), " ".join(f"{r[2]:.1f}" for r in rs))
            for label, rs in runs.items() if rs]
    genai = dict((r[0], r[3]) for r in rows).get("onnxruntime-genai int4")
    print(f"\nSmolLM2-135M, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds; first prompt = a fresh process's "
          "first generation (what one CLI call sees), then the same prompt again (decode tok/s from this one); "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads), KV cache at {context} positions")
    print("| engine | TTFT first prompt ms | TTFT again ms | decode tok/s | vs genai int4 | each round tok/s "
          "| MB read a token | bandwidth limit tok/s | of the limit |\n|---|---|---|---|---|---|---|---|---|")
    for label, cold, warm, tps, each in rows:
        ratio = f"{tps / genai:.2f}" if genai else "-"
        limit = bandwidth / per_token[label]
        print(f"| {label} | {1000 * cold:.0f} | {1000 * warm:.0f} | {tps:.1f} | {ratio} | {each} "
              f"| {per_token[label] / 1e6:.1f} | {limit:.0f} | {tps / limit:.0%} |")


if __name__ == "__main__":
    main()
