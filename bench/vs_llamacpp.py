"""Decode speed of our exports against llama.cpp running the very GGUF file they came from.

    pip install llama-cpp-python          # builds llama.cpp from source (minutes)
    python bench/vs_llamacpp.py --gguf gemma3-270m --aware runs/demo-gemma/onnx-adapter-aware \\
        --merged runs/demo-gemma/onnx-merged [--exact FOLDER] [--threads 2] [--prompt-tokens 128] \\
        [--new-tokens 128] [--rounds 3] [--kl BASE_EXPORT ...]

Engines, each in its own process (thread pools do not meet), batch 1, greedy, end-of-sequence ignored so
each decodes the same count, taking turns for --rounds rounds (this machine drifts by ±20% over minutes; the
table gives medians and the ratio to llama.cpp):
  llama.cpp (llama-cpp-python) on the GGUF file, --threads threads
  qlora-rt runtime on the adapter-aware export: the base alone, and with its `default` adapter active
  qlora-rt runtime on the merged export
  qlora-rt runtime on --exact: an adapter-aware export with --int4-compute fp32 (exactly the trained model)
--kl: next-token KL(file ‖ engine) and top-1 agreement over every position of held-out texts, against the file's
own weights in fp32 (our lazy load with no quantization, which equals transformers' load of the file:
tests/test_gemma3.py): llama.cpp's (logits_all), each listed export's base (its adapter off), and in PyTorch the
base that `train --gguf file` and `--gguf int4` build (the file's tensors as stored; rounded to 4 bits).
--gguf is a path or a bundled name (smollm2-135m, gemma3-270m). Decode tokens/s is the second of two runs of
the same prompt in each process (the first is a user's cold prompt).
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
sys.path.insert(0, str(ROOT))


def prompt_ids(n: int, vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(100, min(vocab, 49000), n).tolist()


def time_llamacpp(gguf: str, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + new + 8,
                verbose=False)

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, (new - 1) / (time.perf_counter() - t1)
    run()
    return run()


def time_runtime(folder: str, adapter: str | None, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    from qlora_rt.runtime import Model

    model = Model(folder, threads=threads)
    model.generate_ids([ids], adapter=adapter, max_new_tokens=new, ignore_eos=True)
    warm = model.generate_ids([ids], adapter=adapter, max_new_tokens=new, ignore_eos=True)[0]
    return warm.ttft_s, warm.decode_tokens_per_s


def one(args) -> None:
    kind, target, adapter = args.one
    ids = prompt_ids(args.prompt_tokens, args.vocab)
    if kind == "llamacpp":
        result = time_llamacpp(target, ids, args.new_tokens, args.threads)
    else:
        result = time_runtime(target, None if adapter == "-" else adapter, ids, args.new_tokens, args.threads)
    print(json.dumps(result))


def kl_table(gguf: str, exports: list[str], threads: int, texts: int = 24) -> None:
    import torch

    from qlora_rt.base import formats
    from qlora_rt.base.load import load
    from qlora_rt.export.verify import distribution_gap, torch_logits
    from qlora_rt.lora.layers import quantize_model
    from qlora_rt.runtime import Model
    from qlora_rt.train.text_data import read_examples

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    rows = read_examples(ROOT / "examples" / "data" / "dates-heldout.jsonl")[:texts]
    loaded = load(gguf, lazy=True)
    seqs = [loaded.tokenizer(r["messages"][0]["content"] + "\n" + r["messages"][1]["content"]).input_ids
            for r in rows]
    ref_model = quantize_model(loaded.model, formats.QuantConfig("none"), torch.device("cpu"), tensors=loaded.tensors)
    refs = torch_logits(ref_model, seqs)
    del ref_model
    results = {}

    def score(label, gots):
        kl, top1 = zip(*(distribution_gap(r, g) for r, g in zip(refs, gots)))
        results[label] = (float(np.concatenate(kl).mean()), float(np.concatenate(top1).mean()))

    for mode in ("file", "int4"):
        one = load(gguf, lazy=True)
        model = quantize_model(one.model, formats.QuantConfig("int4", head=True, gguf=mode), torch.device("cpu"),
                               one.gguf, tensors=one.tensors)
        score(f"PyTorch, train --gguf {mode}", torch_logits(model, seqs))
        del model, one
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_ctx=max(map(len, seqs)) + 8, logits_all=True, verbose=False)
    gots = []
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        gots.append(np.array(llm.scores[:len(ids)], np.float32))
    score("llama.cpp (the GGUF file)", gots)
    del llm
    for folder in exports:
        model = Model(folder, threads=threads)
        score(f"qlora-rt {folder}", [model.logits(ids) for ids in seqs])
        del model
    positions = sum(map(len, seqs))
    print(f"\nnext-token KL against the file's own weights in fp32, {len(seqs)} held-out texts, {positions} positions")
    print(f"{'engine':<60}{'mean KL':>12}{'top-1':>9}")
    for label, (kl, top1) in results.items():
        print(f"{label:<60}{kl:>12.2e}{100 * top1:>8.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default="gemma3-270m")
    p.add_argument("--aware", help="an adapter-aware export of that file, with adapters/default.onnx_adapter")
    p.add_argument("--merged", help="a merged export of that file")
    p.add_argument("--exact", help="an adapter-aware export with --int4-compute fp32 (timed as its base)")
    p.add_argument("--kl", nargs="*", help="measure next-token KL against the file's weights; exports of the bare "
                   "base (no adapter) to score besides llama.cpp and PyTorch's bases")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    from qlora_rt.base.load import resolve

    gguf = str(resolve(args.gguf))
    if args.kl is not None:
        return kl_table(gguf, args.kl, args.threads)
    engines = {"llama.cpp (the GGUF file)": ("llamacpp", gguf, "-")}
    vocab = 0
    if args.aware:
        engines["qlora-rt adapter-aware, base"] = ("runtime", args.aware, "-")
        engines["qlora-rt adapter-aware + adapter"] = ("runtime", args.aware, "default")
        vocab = json.loads((Path(args.aware) / "qlora_rt_export.json").read_text())["vocab"]
    if args.exact:
        engines["qlora-rt adapter-aware exact, base"] = ("runtime", args.exact, "-")
        vocab = json.loads((Path(args.exact) / "qlora_rt_export.json").read_text())["vocab"]
    if args.merged:
        engines["qlora-rt merged"] = ("runtime", args.merged, "-")
        vocab = json.loads((Path(args.merged) / "qlora_rt_export.json").read_text())["vocab"]
    runs: dict[str, list] = {label: [] for label in engines}
    for _ in range(args.rounds):
        for label, spec in engines.items():
            proc = subprocess.run([sys.executable, __file__, "--one", *spec, "--prompt-tokens", str(args.prompt_tokens),
                                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                                   "--vocab", str(vocab or 49152)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
            runs[label].append(tuple(json.loads(proc.stdout.strip().splitlines()[-1])))
    base = float(np.median([r[1] for r in runs["llama.cpp (the GGUF file)"]]))
    print(f"\n{Path(gguf).name}: {args.prompt_tokens} prompt + {args.new_tokens} new tokens, batch 1, greedy, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds")
    print(f"{'engine':<36}{'prompt s':>10}{'decode tok/s':>14}{'vs llama.cpp':>14}  rounds")
    for label, rs in runs.items():
        ttft, tps = (float(np.median([r[i] for r in rs])) for i in range(2))
        print(f"{label:<36}{ttft:>10.3f}{tps:>14.1f}{tps / base:>13.2f}x  {' '.join(f'{r[1]:.1f}' for r in rs)}")


if __name__ == "__main__":
    main()
