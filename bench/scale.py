"""Memory and time of each verb at real model sizes, on random-init checkpoints of real shapes.

Speed and memory do not depend on the weights' values, so the bench writes bf16 safetensors
checkpoints (sharded at 2 GB, as published checkpoints are) of each shape with random weights, and
SmolLM2's tokenizer (vocab cut to 49,152 so that tokenizer serves). Each verb runs in its own
process; peak RSS is that process's ru_maxrss. Next to ours: transformers + bitsandbytes loading the
same checkpoint in 4 bits (`from_pretrained(load_in_4bit=...)`, PEFT's path).

    python bench/scale.py [--shapes smollm2-135m,llama-3.2-1b] [--work /tmp/qlora-rt-scale]
                          [--verbs peer,train,train-whole,merge,export-aware-nf4,export-aware-int4,
                                   export-merged-int4,export-merged-int4-gptq,decode-aware-int4,
                                   decode-merged-int4]

The defaults' path (train and export with no format flags) and its alternatives:
    --verbs train-defaults,train-int8,export-defaults-aware,export-defaults-aware-int8,export-defaults-merged,
            decode-defaults-aware,decode-defaults-aware-int8,decode-defaults-merged

train-whole is `train` as it was before lazy loading (the whole model read in fp32 first), for a
same-run comparison. merge and export use the adapter the train verb wrote (random-init weights:
the exports' parity figures mean nothing here, only their memory and time). decode-* load an
export's folder with the runtime (the adapter-aware one with the trained r16 adapter active) and
decode 128 new tokens after a 128-token prompt, batch 1, greedy, twice; the second run's decode
tokens/s is reported (the first is a user's first prompt: allocation warm-up). Prints a table: verb,
peak RSS, wall time (and tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "dates-train.jsonl"
VOCAB = 49152
SHAPES = {  # model_type, hidden, intermediate, layers, heads, kv heads, tied head, rope theta
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, True, 100000.0),
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, True, 500000.0),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, True, 1000000.0),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, False, 500000.0),
}


def write_checkpoint(shape: str, folder: Path) -> None:
    """A random-init bf16 checkpoint of the shape, one tensor at a time (never the whole model in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_rt.base.load import load

    if (folder / "model.safetensors.index.json").exists():
        return
    kind, hidden, inter, layers, heads, kv, tied, theta = SHAPES[shape]
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                  tie_word_embeddings=tied, rope_theta=theta, max_position_embeddings=8192,
                                  torch_dtype="bfloat16", architectures=[AutoModelForCausalLM.__name__])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.named_parameters():
        t = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * 0.02
        shard[name] = t.bfloat16()
        size += shard[name].numel() * 2
        if size >= 2 * 2**30:
            flush()
    flush()
    config.save_pretrained(folder)
    load("smollm2-135m").tokenizer.save_pretrained(folder)  # its vocabulary is 49,152: it serves every shape
    # last: a folder with an index is complete
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def text_data(work: Path) -> Path:
    """The demo's date examples as plain text (question and answer), so that every example fits --seq-len 64."""
    path = work / "dates-text.jsonl"
    if not path.exists():
        rows = [json.loads(l)["messages"] for l in DATA.read_text().splitlines()]
        path.write_text("".join(json.dumps({"text": f"{m[-2]['content']}\n{m[-1]['content']}"}) + "\n" for m in rows))
    return path


def child(verb: str, folder: str, work: str) -> dict:
    """One verb in this process; returns its wall time (peak RSS is read by the parent)."""
    t0 = time.perf_counter()
    if verb in ("train-defaults", "train-int8"):  # `train`'s defaults (an int4 base), or its products with int8
        from qlora_rt.config import TrainConfig  # activations (--int4-compute int8)
        from qlora_rt.train.run import train

        train(TrainConfig(model=folder, data=str(text_data(Path(work).parent)), out=work, steps=2, batch_size=2,
                          seq_len=64, rank=16, checkpoint_every=0, eval_every=0,
                          int4_compute="int8" if verb == "train-int8" else "fp32"))
    elif verb.startswith("export-defaults-"):  # `export`'s defaults on the train-defaults adapter: adapter-aware
        from qlora_rt.config import ExportConfig  # (-aware), the same with int8 activations (-aware-int8), merged
        from qlora_rt.export.exporter import export

        kind = verb[len("export-defaults-"):]
        export(ExportConfig(model=folder, adapter=str(Path(work).parent / "run-train-defaults" / "adapter"), out=work,
                            mode="merged" if kind == "merged" else "adapter-aware",
                            int4_compute="int8" if kind.endswith("int8") else "auto", max_kl=1e9, min_top1=0))
    elif verb in ("train", "train-whole"):
        import qlora_rt.train.run as tr
        from qlora_rt.config import TrainConfig
        from qlora_rt.train.run import train

        if verb == "train-whole":  # the path before lazy loading, for the same-run comparison
            tr.load = lambda path, lazy=False, real=tr.load: real(path)

        train(TrainConfig(model=folder, data=str(text_data(Path(work).parent)), out=work, steps=2, batch_size=2,
                          seq_len=64, rank=16, quant="nf4", checkpoint_every=0, eval_every=0))
    elif verb.startswith("export-"):
        from qlora_rt.config import ExportConfig
        from qlora_rt.export.exporter import export

        mode = "adapter-aware" if verb.startswith("export-aware") else "merged"
        weights = "nf4" if verb.endswith("nf4") else "int4"
        # gptq: calibrated on the run's own training data (found from the run.yaml beside the adapter)
        export(ExportConfig(model=folder, adapter=str(Path(work).parent / "run-train" / "adapter"), out=work,
                            mode=mode, weights=weights, int4_rounding="gptq" if verb.endswith("gptq") else "rtn",
                            max_kl=1e9, min_top1=0))
    elif verb.startswith("decode-"):
        import numpy as np

        from qlora_rt.runtime import Model

        model = Model(Path(work).parent / f"run-export-{verb[len('decode-'):]}")
        adapter = "default" if "default" in model.adapter_names else None
        ids = np.random.default_rng(0).integers(100, 49000, 128).tolist()
        runs = [model.generate_ids([ids], adapter=adapter, max_new_tokens=128, ignore_eos=True)[0] for _ in range(2)]
        return {"seconds": time.perf_counter() - t0, "tokens_per_s": runs[1].decode_tokens_per_s,
                "ttft_s": runs[1].ttft_s, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    elif verb == "merge":
        from qlora_rt.merge import merge

        merge(folder, str(Path(work).parent / "run-train" / "adapter"), work)
    elif verb == "peer":
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    else:
        raise SystemExit(f"unknown verb {verb}")
    return {"seconds": time.perf_counter() - t0, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(verb: str, folder: Path, work: Path) -> dict:
    out = work / f"run-{verb}"
    if not verb.startswith("decode-"):  # decode only reads an export
        subprocess.run(["rm", "-rf", str(out)], check=True)
    proc = subprocess.run([sys.executable, __file__, "--child", verb, str(folder), str(out)], text=True,
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        return {"peak_gib": float("nan"), "seconds": float("nan")}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the child's own ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--verbs", default="peer,train,train-whole")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlora-rt-scale"))
    ap.add_argument("--child", nargs=3, metavar=("VERB", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    for shape in args.shapes.split(","):
        folder = args.work / shape
        write_checkpoint(shape, folder)
        for verb in args.verbs.split(","):
            r = measure(verb, folder, args.work)
            speed = f"{r['tokens_per_s']:.1f} tok/s, TTFT {r['ttft_s']:.2f} s" if "tokens_per_s" in r else ""
            rows.append((shape, verb, r["peak_gib"], r["seconds"], speed))
            print(f"{shape:14} {verb:8} peak RSS {r['peak_gib']:6.2f} GiB  {r['seconds']:7.1f} s  {speed}", flush=True)
    print("\n| shape | verb | peak RSS (GiB) | wall (s) | decode |\n|---|---|---|---|---|")
    for shape, verb, rss, seconds, speed in rows:
        print(f"| {shape} | {verb} | {rss:.2f} | {seconds:.1f} | {speed} |")


if __name__ == "__main__":
    main()
