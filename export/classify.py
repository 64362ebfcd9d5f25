"""`qlora-rt export` of an encoder classifier: the folder, its manifest, its adapter, and its self-check.

    OUT/model.onnx (+ model.onnx.data)   the encoder graph with its head (export/encoder.py)
    OUT/tokenizer.json ...               the tokenizer (the runtime truncates to max_length)
    OUT/qlora_rt_export.json             family encoder, task classify, label names (merged), head inputs
    OUT/adapters/NAME.onnx_adapter       adapter-aware: LoRA + head + label names, one file per task
    OUT/export_report.json               logits vs PyTorch on examples like the served ones, label agreement
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qlora_rt import __version__
from qlora_rt.classifier import Classifier
from qlora_rt.config import ExportConfig
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, write_json
from qlora_rt.lora import lora_layers
from qlora_rt.manifest import FORMAT, NAME as META, Manifest
from qlora_rt.report import table

from .adapters import ADAPTER_DIR, SUFFIX, adapter_arrays, write_adapter
from .calibration import default_data, encoder_hessians
from .encoder import HeadWriter, add_shared_tensors, build_encoder, head_arrays, spec_of
from .graph import Graph
from .weights import LinearWriter

TOLERANCE = {"fp32": 1e-3, "nf4": 1e-3, "fp16": 5e-2, "int4": 1e-3}
TEXTS = ["a wonderful, moving film", "the battery died after two days and support never answered",
         "it is fine", "Absolutely terrible. Would not buy again!", "ok", "great value for the price",
         "I expected more from this brand, honestly", "five stars"]


def _texts(cfg: ExportConfig, n: int = 16) -> tuple[list[str], list[str] | None]:
    """Texts (and pairs) like the served ones: --calibration, else the adapter's training data, else a few
    sentences."""
    from qlora_rt.classify_data import read

    data = Path(cfg.calibration) if cfg.calibration else default_data(cfg.adapter)
    if cfg.calibration and not data.is_file():
        raise QloraError(f"--calibration: {data} not found")
    if data is None:
        return TEXTS, None
    rows = read(data, "--calibration")[0][:n]
    return [r["text"] for r in rows], [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None


@torch.no_grad()
def verify(folder: Path, model: torch.nn.Module, adapter: Path | None, texts: list[str],
           pairs: list[str] | None) -> dict:
    """The written folder in the runtime users run it with vs the trained model in PyTorch, on the same token
    ids, in padded batches of 4 (so the masks are checked too)."""
    clf = Classifier(folder)
    diffs, agree = [], []
    for i in range(0, len(texts), 4):
        feeds = clf.encode(texts[i:i + 4], pairs[i:i + 4] if pairs else None)
        got = clf.logits(feeds, adapter)
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
        diffs.append(np.abs(got - ref))
        agree += list(got.argmax(-1) == ref.argmax(-1))
    return {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
            "mean_abs_logit_diff": float(np.mean(np.concatenate([d.ravel() for d in diffs]))),
            "label_agreement": float(np.mean(agree)), "examples": len(texts)}


def export_encoder(cfg: ExportConfig, loaded, qcfg, info, t0: float) -> dict:
    model = loaded.model.eval()
    spec = spec_of(model)
    adapted = set(info.modules) if info else set(lora_layers(model))
    labels = (info.labels if info else None) or []
    with atomic_dir(cfg.out, overwrite=True) as tmp:
        g = Graph("encoder", data=tmp / "model.onnx.data")  # weights go to disk as they are made
        add_shared_tensors(g, model, spec)
        writer = LinearWriter(g, model, cfg.mode, cfg.weights, adapted, cfg.block_size)
        head = HeadWriter(g, model, spec, cfg.mode, labels)
        rounding = _calibrate(cfg, writer, model, loaded.tokenizer, spec)
        build_encoder(spec, g, writer, head)
        g.save(tmp / "model.onnx", f"qlora-rt {__version__}")
        report = _write_and_check(cfg, tmp, loaded, qcfg, info, model, spec, writer, head, labels, rounding, t0)
    print(_summary(report, cfg), flush=True)
    return report


def _write_and_check(cfg: ExportConfig, tmp: Path, loaded, qcfg, info, model, spec, writer: LinearWriter,
                     head: HeadWriter, labels: list[str], rounding: str, t0: float) -> dict:
    """The manifest, tokenizer and adapter beside the saved graph, then the self-check and the report."""
    meta = Manifest(format=FORMAT, version=__version__, family="encoder", task="classify", mode=cfg.mode,
                    weights=cfg.weights, model_type=spec.model_type, layers=spec.layers, hidden=spec.hidden,
                    heads=spec.heads, base_model=loaded.source, base_fingerprint=loaded.fingerprint,
                    base_quant=qcfg.format, base_residual=info.metadata.get("base.residual") if info else None,
                    pad_token_id=spec.pad_id, max_length=spec.max_length, token_type_ids=spec.token_types,
                    labels=labels if cfg.mode == "merged" else None,
                    inputs=["input_ids", "attention_mask"] + (["token_type_ids"] if spec.token_types else []),
                    outputs=["logits", "label_names"], lora_inputs={**writer.lora_inputs, **head.inputs},
                    lora_groups=writer.lora_groups)
    meta.external_data = {"model.onnx.data": (tmp / "model.onnx.data").stat().st_size}
    loaded.tokenizer.save_pretrained(tmp)
    write_json(tmp / META, meta.to_json())
    export_s = time.perf_counter() - t0
    adapter_file = None
    if cfg.mode == "adapter-aware" and cfg.adapter:
        adapter_file = write_adapter(adapter_arrays(cfg.adapter, meta)[1], tmp / ADAPTER_DIR / f"{cfg.name}{SUFFIX}",
                                     meta)
    report = _check(cfg, tmp, meta, model, spec, head, adapter_file)
    report.update(export_seconds=export_s, base_quant=qcfg.format, mode=cfg.mode, weights=cfg.weights,
                  adapter=cfg.adapter, labels=labels,
                  files_bytes={p.name: p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()})
    if writer.requant_err:
        report["int4_relative_weight_error_mean"] = sum(writer.requant_err) / len(writer.requant_err)
        report["int4_rounding"] = rounding
    _judge(report, cfg, exact=not writer.requant_err and qcfg.int4_compute == "fp32")
    write_json(tmp / "export_report.json", report)
    return report


def _calibrate(cfg: ExportConfig, writer: LinearWriter, model, tokenizer, spec) -> str:
    """GPTQ statistics for the Linears this export requantizes to int4; returns how they are rounded."""
    names = {n for n in writer.layers if writer.requantizes(n)}
    if not names or cfg.int4_rounding == "rtn":
        return "rtn"
    data = Path(cfg.calibration) if cfg.calibration else default_data(cfg.adapter)
    if data is None or not data.is_file():
        print("int4: no calibration data (--calibration, or a run.yaml beside the adapter): rounding to nearest",
              file=sys.stderr)
        return "rtn (no calibration data)"
    t0 = time.perf_counter()
    writer.hessians, tokens = encoder_hessians(model, tokenizer, data, names, spec.token_types,
                                               min(spec.max_length, 128))
    return f"gptq ({tokens} tokens of {data.name}, {time.perf_counter() - t0:.0f} s)"


def _check(cfg: ExportConfig, tmp: Path, meta: Manifest, model, spec, head: HeadWriter, adapter_file: Path | None) -> dict:
    """Verify through the runtime. A bare-base adapter-aware export (no head of its own) is checked with a
    throw-away adapter holding the model's current head, so the graph is checked all the same."""
    texts, pairs = _texts(cfg)
    if cfg.mode == "adapter-aware" and adapter_file is None:
        with tempfile.TemporaryDirectory() as scratch:
            probe = head_arrays(head.tensors, [f"LABEL_{i}" for i in range(model.config.num_labels)], spec.base)
            return verify(tmp, model, write_adapter(probe, Path(scratch) / f"probe{SUFFIX}", meta), texts, pairs)
    return verify(tmp, model, adapter_file, texts, pairs)


def _judge(report: dict, cfg: ExportConfig, exact: bool) -> None:
    """Exact formats within --tolerance of PyTorch's logits; requantized int4 keeping PyTorch's labels on the
    check examples (--min-top1)."""
    tolerance = cfg.tolerance if cfg.tolerance is not None else TOLERANCE[cfg.weights] if exact else float("inf")
    report["tolerance"] = tolerance if tolerance != float("inf") else None
    report["min_label_agreement"] = cfg.min_top1 if report["tolerance"] is None else None
    where = f"nothing was written to {cfg.out}"
    if report["max_abs_logit_diff"] > tolerance:
        raise QloraError(f"export check failed: max |logit difference| vs PyTorch {report['max_abs_logit_diff']:.2e} "
                         f"exceeds --tolerance {tolerance:g}; {where}")
    if report["min_label_agreement"] is not None and report["label_agreement"] < cfg.min_top1:
        raise QloraError(f"export check failed: labels agree with PyTorch on {100 * report['label_agreement']:.1f}% of "
                         f"{report['examples']} examples (--min-top1 {100 * cfg.min_top1:g}%); {where}")


def _summary(r: dict, cfg: ExportConfig) -> str:
    size = sum(v for k, v in r["files_bytes"].items() if k.startswith("model.onnx")) / 2**20
    return table(f"export {cfg.out}", [
        ("family / task", "encoder / classify"), ("mode / weights", f"{cfg.mode} / {cfg.weights}"),
        ("labels", ", ".join(r["labels"]) or "each adapter brings its own"),
        ("max |dlogit| vs PyTorch", f"{r['max_abs_logit_diff']:.2e} (tolerance "
                                    f"{r['tolerance'] or 'none: approximate, judged by its labels'})"),
        ("label agreement", f"{100 * r['label_agreement']:.1f}% of {r['examples']} examples"),
        ("int4 requantization", f"{r['int4_rounding']}: {100 * r['int4_relative_weight_error_mean']:.2f}% mean "
         "relative weight error" if "int4_relative_weight_error_mean" in r else "-"),
        ("model size", f"{size:,.1f} MiB"), ("export time", f"{r['export_seconds']:.1f} s"),
    ])
