"""`qlora-rt export`: the trained model as a self-contained, self-checked ONNX folder.

    OUT/model.onnx (+ model.onnx_data)   the graph: a decoder (decoder_graph.py) or an encoder (encoder_graph.py)
    OUT/tokenizer.json, ...              the tokenizer (decoders: chat template, generation_config.json)
    OUT/qlora_rt_export.json             the manifest: family, task, I/O, dimensions, the LoRA inputs
    OUT/adapters/NAME.onnx_adapter       adapter-aware exports: one file per adapter
    OUT/export_report.json               the self-check vs PyTorch, file sizes, export time

One flow serves both families; a family (decoder_export.py, encoder_export.py) brings its graph body, its
head, its manifest and its self-check. The folder is built under a temporary name and renamed into place
only after it passed the gate, so a failed export never replaces a good one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from qlora_rt import __version__
from qlora_rt.base import formats
from qlora_rt.base.encoders import is_classifier
from qlora_rt.config import ExportConfig
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, check_out, write_json
from qlora_rt.runtime.manifest import FORMAT, Manifest
from qlora_rt.runtime.manifest import NAME as META
from qlora_rt.train.report import table
from qlora_rt.trained import TrainedModel, base_config, open_trained

from .calibration import calibration_data
from .decoder_export import DecoderFamily
from .devices import ORT_MODEL, ORT_TOLERANCE, write_ort_format
from .encoder_export import EncoderFamily
from .graph import Graph
from .onnx_adapters import ADAPTER_DIR, SUFFIX, adapter_arrays, write_adapter
from .weight_writers import LinearWriter

# an exact export's largest |logit difference| vs PyTorch; an approximate one (requantized int4, int8
# activations) is judged by its next-token (or label) distributions instead: --max-kl, --min-top1
TOLERANCE = {"fp32": 1e-3, "nf4": 1e-3, "int4": 1e-3}  # max |dlogit| of the exports that are the trained model
# fp16 weights round every weight (relative 2^-11): at 135M that moves a logit by up to ~0.07 while the next-token
# distributions stay the same, so fp16 is judged by its distributions, held to far stricter limits than int4's
FP16_LIMITS = (1e-3, 0.98)  # mean KL at most, top-1 agreement at least
WEIGHTS_FILE = "model.onnx_data"  # the name Optimum and transformers.js look for


class Family(Protocol):
    """What a model family plugs into the export flow."""

    name: str  # the graph's name: "decoder" | "encoder"

    def start(self, g: Graph) -> LinearWriter:
        """Shared tensors (embeddings, norms, rotary tables) and the writer every Linear goes through."""

    def calibration_targets(self, writer: LinearWriter) -> set[str]:
        """The Linears (and head) whose int4 weights GPTQ rounds: their inputs' statistics are needed."""

    def hessians(self, writer: LinearWriter, data: Path, names: set[str]) -> tuple[object, int]:
        """Σxᵀx of those Linears' inputs on the calibration examples, and how many tokens they saw."""

    def build(self, g: Graph, writer: LinearWriter) -> None:
        """The graph body and its head."""

    def manifest(self, writer: LinearWriter) -> Manifest: ...

    def save_files(self, folder: Path, meta: Manifest) -> None:
        """Tokenizer (and generation settings, and what other runtimes look for) beside the graph."""

    def exact(self, writer: LinearWriter) -> bool:
        """Whether the ONNX weights compute what PyTorch computes (nothing requantized, fp32 activations)."""

    def check(self, folder: Path, meta: Manifest, adapter_file: Path | None, distributions: bool) -> dict:
        """The written folder through the runtime vs PyTorch: max/mean |dlogit|, mean KL, top-1 agreement."""

    def summary_rows(self, report: dict) -> list[tuple[str, object]]: ...


def tolerance(cfg: ExportConfig, exact: bool) -> float:
    """The max |logit difference| allowed; inf for approximate exports, judged by their distributions."""
    if cfg.tolerance is not None:
        return cfg.tolerance
    return TOLERANCE[cfg.weights] if exact and cfg.weights in TOLERANCE else float("inf")


def _what_passes(cfg: ExportConfig, base: str) -> str:
    """What to do instead, for an approximate export that failed its check."""
    if cfg.int4_compute == "int8" and cfg.mode == "adapter-aware" and base == "int4":
        return "int8 activations moved the model's distributions; --int4-compute fp32 computes the trained bytes " \
               "exactly"
    if cfg.weights == "fp16":
        return "fp16 rounding moved the model's distributions; --weights fp32 keeps the trained weights"
    if cfg.mode == "adapter-aware" and base in ("nf4", "fp4"):
        return (f"the {base} base requantized to int4 is another model; --weights nf4 keeps the trained {base} bytes "
                f"exactly (MatMulBnb4, slower), or train with --quant int4 (the default) for an exact int4 export")
    return ("a merged weight is requantized to int4; --weights fp32 or fp16 keeps it, or try --head fp32, a smaller "
            "--block-size, --calibration with more of the training data, or accept it with --max-kl/--min-top1")


def judge(report: dict, cfg: ExportConfig, exact: bool, base: str = "int4") -> None:
    """Fail the export (nothing is written) when it is not the model it stands for: an exact one within
    --tolerance of PyTorch's logits; an approximate one keeping its next-token (or label) distributions
    (--max-kl, --min-top1)."""
    limit = tolerance(cfg, exact)
    report["tolerance"] = limit if limit != float("inf") else None
    limits = (cfg.max_kl, cfg.min_top1)
    if cfg.weights == "fp16":
        limits = (min(cfg.max_kl, FP16_LIMITS[0]), max(cfg.min_top1, FP16_LIMITS[1]))
    report["max_kl"], report["min_top1"] = limits if limit == float("inf") else (None, None)
    where = f"nothing was written to {cfg.out}"
    if report["max_abs_logit_diff"] > limit:
        raise QloraError(f"export check failed: max |logit difference| vs PyTorch {report['max_abs_logit_diff']:.2e} "
                         f"exceeds --tolerance {limit:g}; {where}")
    max_kl, min_top1 = report["max_kl"], report["min_top1"]
    if max_kl is not None and (report["mean_kl"] > max_kl or report["top1_agreement"] < min_top1):
        measured = f"mean KL {report['mean_kl']:.3g} (limit {max_kl:g}), top-1 agreement " \
                   f"{100 * report['top1_agreement']:.1f}% (limit {100 * min_top1:g}%)"
        raise CheckFailed(f"export check failed: {report['what_agrees']} vs PyTorch over {report['positions']} "
                          f"positions: {measured}: {_what_passes(cfg, base)}; {where}", measured)


class CheckFailed(QloraError):
    """An approximate export's distributions moved past --max-kl/--min-top1 (what was measured: .measured)."""

    def __init__(self, message: str, measured: str) -> None:
        super().__init__(message)
        self.measured = measured


def _stage(t0: float, what: str) -> None:
    """One progress line on stderr, as training prints its steps: an export of a large model takes minutes."""
    print(f"export [{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)


def _calibrate(cfg: ExportConfig, family: Family, writer: LinearWriter, t0: float) -> str:
    """GPTQ statistics for what this export requantizes to int4; returns how it is rounded."""
    names = family.calibration_targets(writer)
    if not names or cfg.int4_rounding == "rtn" or cfg.weights == "int8":  # int8 per column: to nearest
        return "rtn"
    data = calibration_data(cfg)
    if data is not None:
        _stage(t0, f"GPTQ calibration of {len(names)} weights on {data.name}")
    if data is None:
        print("int4: no calibration data (--calibration, or a run.yaml beside the adapter): rounding to nearest",
              file=sys.stderr)
        return "rtn (no calibration data)"
    writer.hessians, tokens = family.hessians(writer, data, names)
    return f"gptq ({tokens} tokens of {data.name})"


def _family(cfg: ExportConfig, trained: TrainedModel) -> Family:
    return (EncoderFamily if is_classifier(trained.loaded.model) else DecoderFamily)(cfg, trained)


def export(cfg: ExportConfig, trained: TrainedModel | None = None) -> dict:
    """trained: what `open_trained(cfg.model, cfg.adapter)` returned, when the caller already holds it
    (one load for several exports); it is only read, never changed."""
    cfg.check()
    check_out(cfg.out, cfg.overwrite, META, FORMAT, "export", reads=(cfg.adapter, cfg.model, cfg.calibration))
    t0 = time.perf_counter()
    given = None if cfg.int4_compute == "auto" else cfg.int4_compute
    if trained is None:  # what the adapter's files say is checked before the model loads (minutes on a big one)
        base, _ = base_config(cfg.model, cfg.adapter, cfg.quant, given)
        if cfg.weights == "nf4" and base.format not in ("nf4", "fp4"):
            what = "the adapter's base" if cfg.adapter else "a bare base (without --quant)"
            raise QloraError(f"--weights nf4 needs a base trained in nf4 or fp4, and {what} is {base.format}: use "
                             "--weights auto (its own format) or int4|fp16|fp32")
        _stage(t0, f"loading {cfg.model}" + (f" with {cfg.adapter}" if cfg.adapter else ""))
        trained = open_trained(cfg.model, cfg.adapter, cfg.quant)
    elif given:
        base_config(cfg.model, cfg.adapter, cfg.quant, given)  # refuses --int4-compute on a base that is not int4
    if cfg.weights == "auto":  # the trained base's own format where onnxruntime runs it exactly and fast
        cfg = replace(cfg, weights="int4" if trained.quant.format == "int4" else "fp32")
    compute = int4_compute(cfg, trained)
    try:
        report, family = _write(replace(cfg, int4_compute=compute), trained, t0)
    except CheckFailed as e:  # `auto` chose int8 activations for speed; they must keep the trained model
        if cfg.int4_compute != "auto" or compute != "int8" or cfg.mode != "adapter-aware":
            raise
        _stage(t0, f"int8-activation products failed the check ({e.measured}): writing the exact fp32-activation "
                   "products instead")
        report, family = _write(replace(cfg, int4_compute="fp32"), trained, t0, {"int8_check_failed": e.measured})
    print(summary(report, cfg, family), flush=True)
    return report


def int4_compute(cfg: ExportConfig, trained: TrainedModel) -> str | None:
    """How the trained int4 bytes' products are computed: as --int4-compute says, or under `auto` with int8
    activations for a decoder (MatMulNBits' fast CPU path, docs/benchmarks.md; judged
    by its distributions against the trained model, with the exact fp32 path as the fallback) and as trained
    for an encoder. None where nothing is int4."""
    if cfg.int4_compute != "auto":
        return cfg.int4_compute
    if trained.quant.format != "int4" or cfg.weights not in ("int4", "auto") or is_classifier(trained.loaded.model):
        return None
    return "int8"


def _write(cfg: ExportConfig, trained: TrainedModel, t0: float, extra: dict | None = None) -> tuple[dict, Family]:
    """Build, check and judge the folder under a temporary name; renamed to cfg.out only when it passed.
    extra: more for the report."""
    family = _family(cfg, trained)
    with atomic_dir(cfg.out, overwrite=True) as tmp:
        g = Graph(family.name, data=tmp / WEIGHTS_FILE)  # weights go to disk as they are made
        writer = family.start(g)
        rounding = _calibrate(cfg, family, writer, t0)
        products = f", {cfg.int4_compute} activations" if cfg.int4_compute and cfg.weights == "int4" else ""
        _stage(t0, f"building the {cfg.mode} graph ({cfg.weights} weights{products})")
        family.build(g, writer)
        g.save(tmp / "model.onnx", f"qlora-rt {__version__}")
        meta = family.manifest(writer)
        meta.external_data = {WEIGHTS_FILE: (tmp / WEIGHTS_FILE).stat().st_size}  # a copy is checked on load
        family.save_files(tmp, meta)
        write_json(tmp / META, meta.to_json())
        adapter_file = None
        if cfg.mode == "adapter-aware" and cfg.adapter:
            arrays = adapter_arrays(cfg.adapter, meta)[1]
            adapter_file = write_adapter(arrays, tmp / ADAPTER_DIR / f"{cfg.name}{SUFFIX}", meta)
        export_s = time.perf_counter() - t0
        exact = family.exact(writer)
        _stage(t0, "checking the written folder against PyTorch")
        # an approximate export is judged by distributions, which its check computes on calibration examples
        report = family.check(tmp, meta, adapter_file, distributions=tolerance(cfg, exact) == float("inf"))
        if cfg.ort_format:
            _stage(t0, "writing and checking model.ort")
            report["ort_format_max_abs_logit_diff"] = diff = write_ort_format(tmp, adapter_file)
            if diff > ORT_TOLERANCE:
                raise QloraError(f"--ort-format: {ORT_MODEL} differs from model.onnx by {diff:.2e} in the logits "
                                 f"(limit {ORT_TOLERANCE:g}); nothing was written to {cfg.out}")
        report.update(export_seconds=export_s, base_quant=trained.quant.format,
                      base_types=formats.types_of(trained.loaded.model), mode=cfg.mode, weights=cfg.weights,
                      adapter=cfg.adapter, int4_activations=meta.int4_activations,
                      files_bytes={p.name: p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
                      **(extra or {}))
        if writer.requant_err:
            report["int4_relative_weight_error_mean"] = sum(writer.requant_err) / len(writer.requant_err)
            report["int4_rounding"] = f"{rounding}, block {'/'.join(map(str, sorted(writer.requant_blocks)))}"
        if writer.requant8_err:
            report["int8_requantized"] = len(writer.requant8_err)
            report["int8_relative_weight_error_mean"] = sum(writer.requant8_err) / len(writer.requant8_err)
        judge(report, cfg, exact, trained.quant.format)
        write_json(tmp / "export_report.json", report)
    return report, family


def _products(r: dict) -> str:
    if r["int4_activations"] == "fp32":
        return "fp32 activations" + (f" (int8 ones failed the check: {r['int8_check_failed']})"
                                     if "int8_check_failed" in r else "")
    return "int8 activations (fast; --int4-compute fp32 for the exact, slower products)"


def summary(r: dict, cfg: ExportConfig, family: Family) -> str:
    size = sum(v for k, v in r["files_bytes"].items() if k.startswith("model.onnx")) / 2**20
    limits = f" (limits {r['max_kl']:g}, {100 * r['min_top1']:g}%)" if r["max_kl"] is not None else ""
    requant = "-"
    if "int4_relative_weight_error_mean" in r:
        requant = f"{r['int4_rounding']}: {100 * r['int4_relative_weight_error_mean']:.2f}% mean relative weight error"
    if "int8_requantized" in r:
        what = "weights to int8 per column" if cfg.weights == "int8" else "8-bit base weights to 8 bits (rtn, block 32)"
        requant = ("" if requant == "-" else requant + "; ") + (
            f"{r['int8_requantized']} {what}: {100 * r['int8_relative_weight_error_mean']:.3f}% mean relative weight "
            "error")
    return table(f"export {cfg.out}", [
        ("family / mode / weights", f"{family.name} / {cfg.mode} / {cfg.weights}"),
        ("max |dlogit| vs PyTorch", f"{r['max_abs_logit_diff']:.2e} (tolerance "
                                    f"{r['tolerance'] or 'none: approximate, judged by its distributions'})"),
        ("mean |dlogit|", f"{r['mean_abs_logit_diff']:.2e}"),
        (r["what_agrees"], f"mean KL {r['mean_kl']:.2e}, top-1 agreement {100 * r['top1_agreement']:.1f}% "
                           f"over {r['positions']} positions{limits}"),
        *([("base weights", ", ".join(f"{n} {t}" for t, n in r["base_types"].items()))] if r.get("base_types")
          else []),
        ("requantization", requant),
        *([("4-bit products", _products(r))] if r.get("int4_activations") else []),
        *family.summary_rows(r),
        *([("ORT format", f"{ORT_MODEL}: max |dlogit| vs model.onnx {r['ort_format_max_abs_logit_diff']:.2e}")]
          if "ort_format_max_abs_logit_diff" in r else []),
        ("model size", f"{size:,.1f} MiB"), ("export time", f"{r['export_seconds']:.1f} s"),
    ])
