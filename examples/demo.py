"""The main job, end to end on a bundled model (SmolLM2-135M-Instruct by default, --model gemma3-270m), CPU only.

1. train r=16 LoRA adapters on the date task (examples/make_dataset.py: rewrite any date as
   YYYY-MM-DD) with `train`'s defaults: the frozen base is the GGUF's own tensors as it stores them (4-bit
   types in 4 bits, 5-, 6- and 8-bit types in 8, the Q8_0 output head too: the model llama.cpp runs; --gguf
   int4 rounds every weight to 4 bits with integer zero points instead);
2. export it twice with `export`'s defaults: adapter-aware int4 (the trained bytes, computed with int8
   activations, + adapters/default.onnx_adapter) and merged int4 (the adapter folded in, requantized), each
   verified against PyTorch;
3. answer the held-out prompts with the torch-free runtime: the base (no adapter), the adapter-aware
   export with its adapter, the merged export; and with PyTorch as the reference;
4. print answers side by side and a table of held-out exact match, times and decode speed.

    python examples/demo.py [--steps 60] [--out runs/demo] [--gguf file|int4] [--[no-]quant-head]
                            [--int4-compute fp32|int8] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_dataset import main as make_dataset  # noqa: E402

from qlora_rt.base.load import check_model  # noqa: E402
from qlora_rt.config import ExportConfig, TrainConfig  # noqa: E402
from qlora_rt.export.exporter import export  # noqa: E402
from qlora_rt.runtime.decoder import Model  # noqa: E402
from qlora_rt.train.answers import answer, exact_match, prompt_messages, reference_answer  # noqa: E402
from qlora_rt.train.report import table  # noqa: E402
from qlora_rt.train.run import train  # noqa: E402
from qlora_rt.train.text_data import read_examples  # noqa: E402
from qlora_rt.trained import open_trained  # noqa: E402

DATA = HERE / "data"
MODEL = "smollm2-135m"


def offline_answers(folder: Path, prompts: list, adapter: str | None) -> tuple[list[str], float]:
    """Greedy answers from an export with the torch-free runtime, and its decode tokens/s (batch 1)."""
    model = Model(folder)
    out = [c.text.strip() for c in model.generate(prompts, adapter=adapter, max_new_tokens=12)]
    speed = model.generate_ids([model.encode(prompts[0])], adapter=adapter, max_new_tokens=32, ignore_eos=True)[0]
    return out, speed.decode_tokens_per_s


def has_chat_template(model: str) -> bool:
    from transformers import AutoTokenizer

    _, kwargs, folder = check_model(model)
    return AutoTokenizer.from_pretrained(folder, **kwargs).chat_template is not None


def as_completion(row: dict) -> dict:
    """A chat row as a prompt and its completion, for a base model without a chat template (Gemma 3 270M's file
    has none): the question, a newline, the answer."""
    return {"prompt": prompt_messages(row)[-1]["content"] + "\n", "completion": reference_answer(row)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="a bundled name (smollm2-135m, gemma3-270m), a .gguf or a folder")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--show", type=int, default=8, help="held-out answers to print side by side")
    p.add_argument("--gguf", default="auto", choices=("auto", "file", "int4"),
                   help="the GGUF's tensors as stored (file, the default), or rounded once to 4 bits with integer "
                        "zero points (int4)")
    p.add_argument("--int4-compute", default="fp32", choices=("fp32", "int8"),
                   help="fp32: the adapter-aware export is exact; int8: faster, approximate "
                        "(see qlora_rt/base/packed_int4.py)")
    p.add_argument("--quant-head", action=argparse.BooleanOptionalAction, default=None,
                   help="train on a quantized head too (the file's own, for a GGUF), so the int4 exports run it "
                        "exactly (the default)")
    args = p.parse_args()
    out = Path(args.out)
    if not (DATA / "dates-train.jsonl").exists():
        make_dataset()
    if out.exists():
        print(f"removing the previous demo run in {out}", file=sys.stderr)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model_name = args.model
    chat = has_chat_template(model_name)
    data = DATA / "dates-train.jsonl"
    if not chat:
        out.mkdir(parents=True)
        data = out / "dates-train-completion.jsonl"
        data.write_text("".join(json.dumps(as_completion(r)) + "\n" for r in read_examples(DATA / "dates-train.jsonl")))
    result = train(TrainConfig(model=model_name, data=str(data), out=str(out / "run"),
                               gguf=args.gguf, quant_head=args.quant_head, int4_compute=args.int4_compute,
                               steps=args.steps, batch_size=4, seq_len=256, rank=16, alpha=32,
                               lr=1e-3, eval_every=0, checkpoint_every=20))
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained = open_trained(model_name, result.adapter)  # one load for both exports and the PyTorch reference
    reports = {mode: export(ExportConfig(model=model_name, adapter=str(result.adapter), out=str(out / f"onnx-{mode}"),
                                         mode=mode), trained)
               for mode in ("adapter-aware", "merged")}
    export_s = time.perf_counter() - t0

    rows = read_examples(DATA / "dates-heldout.jsonl")
    prompts = [prompt_messages(r) if chat else as_completion(r)["prompt"] for r in rows]
    refs = [reference_answer(r) for r in rows]
    aware = out / "onnx-adapter-aware"
    base, base_tps = offline_answers(aware, prompts, None)  # no adapter: the int4 base alone
    tuned_onnx, aware_tps = offline_answers(aware, prompts, "default")
    merged_onnx, merged_tps = offline_answers(out / "onnx-merged", prompts, None)
    loaded = trained[0]
    tuned_torch = answer(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12)

    print(f"\n{'date as written':<44}{'base (int4)':<16}{'fine-tuned (ONNX, adapter)':<28}")
    for row, b, t in list(zip(rows, base, tuned_onnx))[: args.show]:
        question = prompt_messages(row)[-1]["content"].splitlines()[-1]
        b, t = (" ".join(a.split())[:14] for a in (b, t))  # one line each, however the model answered
        print(f"{question[:42]:<44}{b:<16}{t:<28}")
    scores = {k: exact_match(v, refs) for k, v in (("base", base), ("torch", tuned_torch), ("aware", tuned_onnx),
                                                     ("merged", merged_onnx))}
    gain = scores["torch"] - scores["base"]

    def kept(key: str) -> str:
        if gain <= 0:
            return f"{100 * scores[key]:.1f}%"
        return f"{100 * scores[key]:.1f}%  ({100 * (scores[key] - scores['base']) / gain:.0f}% of the gain)"

    ra, rm = reports["adapter-aware"], reports["merged"]
    print()
    print(table(f"demo: held-out date rewriting, exact match over {len(rows)} prompts", [
        (f"base {model_name} (int4, runtime)", f"{100 * scores['base']:.1f}%"),
        ("fine-tuned, PyTorch (int4 + LoRA r=16)", f"{100 * scores['torch']:.1f}%"),
        ("fine-tuned, ONNX adapter-aware int4", kept("aware")),
        ("fine-tuned, ONNX merged int4", kept("merged")),
        ("training", f"{result.steps} steps, {train_s:.0f} s (load included), {result.tokens_per_s:.0f} tok/s"),
        ("export (both, one load)", f"{export_s:.0f} s; next-token mean KL vs PyTorch: adapter-aware "
                                    f"{ra['mean_kl']:.1e} ({ra['int4_activations']} activations), merged "
                                    f"{rm['mean_kl']:.1e}"),
        ("decode tokens/s (runtime, batch 1)", f"adapter-aware + adapter {aware_tps:.1f}, merged {merged_tps:.1f}, "
                                               f"base {base_tps:.1f}"),
        ("exports", f"{aware}  {out / 'onnx-merged'}"),
    ]))
    question = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\n4th of July 2031"
    print(f"\ntry it:  qlora-rt generate {aware} --adapter default {'--chat ' if chat else ''}--prompt "
          f"\"{question}{'' if chat else chr(10)}\"")


if __name__ == "__main__":
    main()
