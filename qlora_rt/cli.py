"""`qlora-rt VERB [flags]`: each verb is a typed function whose flags come from its config dataclass.

Precedence: the dataclass defaults, then `--config run.yaml`, then flags given on the command line.
A `QloraError` prints as one line, `qlora-rt VERB: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from qlora_rt.config import (
    ChatConfig,
    ClassifyConfig,
    ExportAdapterConfig,
    ExportConfig,
    GenerateConfig,
    MergeConfig,
    ServeConfig,
    TrainConfig,
    WebConfig,
)
from qlora_rt.errors import QloraError
from qlora_rt.flags import add_flags, build

DRAIN_S = 20  # serve: on SIGTERM, how long running requests may go on before they are ended


def _train(args: argparse.Namespace) -> int:
    import os

    cfg = build(TrainConfig, args)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # launch the same command on N processes
        from qlora_rt.train.distributed import launch
        from qlora_rt.train.run import preflight

        preflight(cfg)  # what would stop every process alike is said once, before any starts
        return launch(_without_nproc(args.argv[1:]), cfg.nproc)
    from qlora_rt.train.run import train

    train(cfg)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _merge(args: argparse.Namespace) -> None:
    from qlora_rt.merge import merge

    cfg = build(MergeConfig, args)
    out = merge(cfg.model, cfg.adapter, cfg.out, cfg.quant, cfg.overwrite)
    print(f"merged checkpoint written to {out}", file=sys.stderr)


def _export(args: argparse.Namespace) -> None:
    from qlora_rt.export.exporter import export

    export(build(ExportConfig, args))


def _export_adapter(args: argparse.Namespace) -> None:
    from qlora_rt.export.onnx_adapters import export_adapter

    cfg = build(ExportAdapterConfig, args)
    print(f"adapter written to {export_adapter(cfg.adapter, cfg.onnx, cfg.name, cfg.overwrite)}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    from qlora_rt.runtime.console import generate

    generate(build(GenerateConfig, args))


def _chat(args: argparse.Namespace) -> None:
    from qlora_rt.runtime.console import chat

    chat(build(ChatConfig, args))


def _classify(args: argparse.Namespace) -> None:
    import json

    from qlora_rt.runtime.classifier import Classifier, classify_file, warn_truncated

    cfg = build(ClassifyConfig, args)
    clf = Classifier(cfg.folder, threads=cfg.threads)
    if cfg.input and cfg.output:
        n = classify_file(clf, Path(cfg.input), Path(cfg.output), cfg.adapter, cfg.batch_size)
        print(f"{n} predictions written to {cfg.output}", file=sys.stderr)
    elif cfg.input:
        n = classify_file(clf, Path(cfg.input), None, cfg.adapter, cfg.batch_size)
    else:
        preds = clf.classify(cfg.text, cfg.text_pair, adapter=cfg.adapter, batch_size=cfg.batch_size)
        n = len(preds)
        for text, p in zip(cfg.text, preds):
            shown = json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)
            print(f"{p.label}\t{p.probs[p.label]:.3f}\t{shown}")
    warn_truncated(clf, n)


def _serve(args: argparse.Namespace) -> None:
    cfg = build(ServeConfig, args)
    try:
        import uvicorn

        from qlora_rt.server import create_app
    except ModuleNotFoundError as e:
        raise QloraError(f"serve needs {e.name}, which this install does not include: pip install "
                         "'qlora-rt[serve]' (in a clone: pip install '.[serve]')") from None
    key = cfg.key()
    app = create_app(cfg.folder, api_key=key, max_batch=cfg.max_batch, threads=cfg.threads,
                     adapters_dir=cfg.adapters_dir, served_model_name=cfg.served_model_name,
                     max_seq_len=cfg.max_seq_len, max_queue=cfg.max_queue, max_body=cfg.max_body_mb << 20,
                     allowed_hosts=cfg.hosts())
    state = app.state.qlora
    names = ", ".join(["(base)", *state.adapters.names()])
    where = "this machine only" if cfg.host in ("127.0.0.1", "localhost", "::1") else "the network: anyone who can " \
        "reach it" + ("" if key else ", with no --api-key")
    print(f"serving {cfg.folder} ({names}) on http://{cfg.host}:{cfg.port}/v1 — reachable from {where}",
          file=sys.stderr)
    if state.engine is not None and state.model.meta.int4_activations == "fp32" and cfg.max_batch > 1:
        print("note: this export's 4-bit products take fp32 activations (exact), and onnxruntime gains little from "
              "decoding several streams at once that way; for throughput export it with --int4-compute int8 "
              "(docs/serving.md#speed)", file=sys.stderr)
    engine = state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: running streams get DRAIN_S to finish, then each
            if engine is not None and not self.should_exit:  # ends with an error event and [DONE], not a cut
                threading.Thread(target=engine.close, args=(DRAIN_S,), daemon=True).start()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                          timeout_graceful_shutdown=DRAIN_S + 10)).run()


def _web(args: argparse.Namespace) -> None:
    from qlora_rt.runtime.web import build_site, serve

    cfg = build(WebConfig, args)
    out = build_site(cfg.folder, cfg.out, cfg.node_modules, cfg.overwrite)
    print(f"site written to {out}: serve it from any static host (with the headers in docs/devices.md#browser "
          "for several threads), or here with --serve", file=sys.stderr)
    if cfg.serve:
        serve(out, cfg.host, cfg.port)


TRAINING_PACKAGES = ("torch", "bitsandbytes", "transformers", "safetensors", "gguf", "tqdm", "onnx")

VERBS = {
    "train": (_train, TrainConfig, "fine-tune LoRA adapters on a 4-bit frozen base",
              "Train LoRA adapters (fp32) on a frozen 4-bit base. Writes OUT/adapter (PEFT layout), "
              "OUT/checkpoint, OUT/metrics.jsonl and OUT/run.yaml."),
    "merge": (_merge, MergeConfig, "fold an adapter into its base: an fp32 HF checkpoint",
              "Dequantize the 4-bit base exactly as trained, add (alpha/r)*B@A in fp32, check for NaN, "
              "and write a plain Hugging Face checkpoint (safetensors)."),
    "export": (_export, ExportConfig, "export to ONNX (merged or adapter-aware), verified against PyTorch",
               "Build the graph (decoder or encoder) op by op from the trained weights, write a self-contained "
               "folder, and check it against the PyTorch model (export_report.json); fails above --tolerance."),
    "export-adapter": (_export_adapter, ExportAdapterConfig, "add an adapter to an adapter-aware export",
                       "Write another trained adapter as OUT/adapters/NAME.onnx_adapter, without re-exporting."),
    "generate": (_generate, GenerateConfig, "complete prompts offline with an export (no torch needed)",
                 "Run an exported folder with onnxruntime: KV cache, greedy or seeded sampling, stop strings, "
                 "an adapter chosen per call. Needs only onnxruntime, numpy, tokenizers (and jinja2 for --chat)."),
    "classify": (_classify, ClassifyConfig, "label texts offline with an encoder export (no torch needed)",
                 "Run an exported classifier with onnxruntime: prints each text's label and its probability, or "
                 "writes one {\"label\", \"probs\"} JSON line per --input line. Adapter-aware exports take the task "
                 "with --adapter (its head and label names come with it)."),
    "serve": (_serve, ServeConfig, "an OpenAI-compatible HTTP server over an export (no torch needed)",
              "Serve an export over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models; "
              "/v1/classify for encoder exports). The model name of a request picks its adapter; requests with "
              "different adapters are decoded together. Binds 127.0.0.1 unless --host says otherwise."),
    "web": (_web, WebConfig, "a static web page that runs an export in the browser (no server compute)",
            "Write a site folder: a page and its JavaScript runtime (onnxruntime-web on WebGPU or wasm, adapters "
            "swapped per request, the tokenizer and chat template) with the export beside them. Any static host "
            "serves it; --serve serves it here."),
    "chat": (_chat, ChatConfig, "talk to an export interactively (no torch needed)",
             "An interactive conversation with an exported folder, using its chat template. "
             "/adapter NAME switches adapters without reloading; /reset forgets; /exit quits."),
}


def parser() -> argparse.ArgumentParser:
    from qlora_rt import __version__

    p = argparse.ArgumentParser(prog="qlora-rt", description="Fine-tune a 4-bit base with LoRA, export to "
                                "ONNX, run offline.")
    p.add_argument("--version", action="version", version=f"qlora-rt {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (func, cls, short, long) in VERBS.items():
        sp = sub.add_parser(name, help=short, description=long)
        sp.add_argument("--config", help="YAML file of settings (a run.yaml works); flags given override it")
        add_flags(sp, cls)
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        code = args.func(args)
    except QloraError as e:
        import os

        # several processes stop on the same error: rank 0 says it (a rank's own trouble names the rank)
        if os.environ.get("RANK", "0") == "0" or str(e).startswith("rank "):
            print(f"qlora-rt {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in TRAINING_PACKAGES:
            print(f"qlora-rt {args.verb}: error: needs {e.name.split('.')[0]}, which the runtime-only install does "
                  "not include: pip install 'qlora-rt[export]' (in a clone: pip install '.[export]')", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130
    return code or 0
