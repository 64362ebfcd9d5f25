"""`qlora-rt export`: the trained model as a self-contained, self-verified ONNX folder.

    OUT/model.onnx (+ model.onnx.data)   the decoder graph (export/decoder.py)
    OUT/tokenizer.json, tokenizer_config.json (chat template), generation_config.json
    OUT/qlora_rt_export.json             I/O names, dimensions, eos ids, mode, the LoRA inputs
    OUT/adapters/NAME.onnx_adapter       adapter-aware exports: one file per adapter
    OUT/export_report.json               parity vs PyTorch, file sizes, export time

The folder is built under a temporary name and renamed into place only after it verified, so a
failed export never replaces a good one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .adapters import ADAPTER_DIR, SUFFIX, adapter_arrays, write_adapter
from .calibration import HEAD, default_data, hessians
from qlora_rt.data import load_examples
from .classify import export_encoder
from .decoder import DecoderSpec, build_decoder
from .graph import Graph
from .verify import verify
from .weights import HeadWriter, LinearWriter, add_shared_tensors, head_format, trained_head
from qlora_rt import __version__, quant
from qlora_rt.adapters import open_trained
from qlora_rt.config import ExportConfig
from qlora_rt.encoder import is_classifier
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, check_out, write_json
from qlora_rt.load import SUPPORTED
from qlora_rt.lora import lora_layers
from qlora_rt.report import table
from qlora_rt.manifest import FORMAT, KV_CACHE, NAME as META, Manifest

TOLERANCE = {"fp32": 1e-3, "nf4": 1e-3, "fp16": 5e-2, "int4": float("inf")}  # int4: requantized (see below)
MAX_ROPE_TABLE = 32768  # positions; longer contexts need a larger table (recorded as max_context)


def spec_of(config) -> DecoderSpec:
    if config.model_type not in SUPPORTED:
        raise QloraError(f"architecture {config.model_type!r} is not supported by the exporter yet; "
                         f"supported: {', '.join(SUPPORTED)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                       config.model_type == "qwen3")


def _metadata(cfg: ExportConfig, loaded, info, spec: DecoderSpec, quant_format: str, writer: LinearWriter,
              max_context: int) -> Manifest:
    gen = loaded.model.generation_config
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else loaded.tokenizer.eos_token_id
    return Manifest(format=FORMAT, version=__version__, family="decoder", task="causal-lm", mode=cfg.mode,
                    weights=cfg.weights, model_type=loaded.model.config.model_type, layers=spec.layers,
                    hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                    vocab=spec.vocab, max_context=max_context, eos_token_ids=eos if isinstance(eos, list) else [eos],
                    pad_token_id=loaded.tokenizer.pad_token_id, base_model=loaded.source,
                    base_fingerprint=loaded.fingerprint, base_quant=quant_format,
                    # PiSSA/LoftQ: the digest of the residual base the adapter was trained on (qlora_rt/svdinit.py)
                    base_residual=info.metadata.get("base.residual") if info else None, kv_cache=KV_CACHE,
                    inputs=["input_ids", "attention_mask", "position_ids", "past_key_values.N.key",
                            "past_key_values.N.value", "logits_to_keep"],
                    outputs=["logits", "present.N.key", "present.N.value"],
                    lora_inputs=writer.lora_inputs, lora_groups=writer.lora_groups)


def _calibration_data(cfg: ExportConfig) -> Path | None:
    """Examples like the ones the model serves: --calibration, else the training data of the adapter's run."""
    data = Path(cfg.calibration) if cfg.calibration else default_data(cfg.adapter)
    if cfg.calibration and not data.is_file():
        raise QloraError(f"--calibration: {data} not found")
    return data


def _samples(cfg: ExportConfig, tokenizer, n: int = 16, seq_len: int = 256) -> list[list[int]]:
    """Token ids of a few calibration examples: the verification compares next-token distributions on them."""
    data = _calibration_data(cfg)
    return [e.input_ids for e in load_examples(data, tokenizer, seq_len)[0][:n]] if data else []


def _tolerance(cfg: ExportConfig, exact: bool) -> float:
    """The max |logit difference| allowed; inf for approximate exports, judged by their distributions."""
    return cfg.tolerance if cfg.tolerance is not None else 1e-3 if exact else TOLERANCE[cfg.weights]


def _judge(report: dict, cfg: ExportConfig, exact: bool) -> None:
    """Fail the export (nothing is written) when it is not the model it stands for: exact formats within
    --tolerance of PyTorch's logits; approximate ones (requantized int4, int8 activations) keeping its
    next-token distributions (--max-kl, --min-top1)."""
    tolerance = _tolerance(cfg, exact)
    report["tolerance"] = tolerance if tolerance != float("inf") else None
    report["max_kl"], report["min_top1"] = (cfg.max_kl, cfg.min_top1) if tolerance == float("inf") else (None, None)
    where = f"nothing was written to {cfg.out}"
    if report["max_abs_logit_diff"] > tolerance:
        raise QloraError(f"export check failed: max |logit difference| vs PyTorch {report['max_abs_logit_diff']:.2e} "
                         f"exceeds --tolerance {tolerance:g}; {where}")
    if report["max_kl"] is not None and (report["mean_kl"] > cfg.max_kl or report["top1_agreement"] < cfg.min_top1):
        raise QloraError(f"export check failed: next-token distributions vs PyTorch over {report['positions']} "
                         f"positions: mean KL {report['mean_kl']:.3g} (--max-kl {cfg.max_kl:g}), top-1 agreement "
                         f"{100 * report['top1_agreement']:.1f}% (--min-top1 {100 * cfg.min_top1:g}%); the int4 "
                         f"weights are too far from the trained model (try --int4-rounding gptq with --calibration, "
                         f"a smaller --block-size or --head fp32, or accept it with --max-kl/--min-top1); {where}")


def _calibrate(cfg: ExportConfig, writer: LinearWriter, model, tokenizer, head: str) -> str:
    """GPTQ statistics for the Linears this export requantizes to int4 (and the head, when it is int4);
    returns how they are rounded."""
    names = {n for n in writer.layers if writer.requantizes(n)} | ({HEAD} if head == "int4" else set())
    if not names or cfg.int4_rounding == "rtn":
        return "rtn"
    data = _calibration_data(cfg)
    if data is None:
        print("int4: no calibration data (--calibration, or a run.yaml beside the adapter): rounding to nearest",
              file=sys.stderr)
        return "rtn (no calibration data)"
    writer.hessians, tokens = hessians(model, tokenizer, data, names)  # computed a layer at a time while writing
    return f"gptq ({tokens} tokens of {data.name})"


def export(cfg: ExportConfig, trained: tuple | None = None) -> dict:
    """trained: what `open_trained(cfg.model, cfg.adapter)` returned, when the caller already holds it
    (one load for several exports); it is only read, never changed."""
    cfg.check()
    check_out(cfg.out, cfg.overwrite, META, FORMAT, "export", reads=(cfg.adapter, cfg.model, cfg.calibration))
    t0 = time.perf_counter()
    loaded, qcfg, info = trained or open_trained(cfg.model, cfg.adapter)
    if is_classifier(loaded.model):  # the encoder family (export/classify.py)
        return export_encoder(cfg, loaded, qcfg, info, t0)
    model = loaded.model.eval()
    spec = spec_of(model.config)
    layers = lora_layers(model)
    # adapter-aware: LoRA inputs on the trained adapter's modules, or on every Linear for a bare base
    adapted = set(info.modules) if info else set(layers)
    max_context = min(model.config.max_position_embeddings, MAX_ROPE_TABLE)
    with atomic_dir(cfg.out, overwrite=True) as tmp:
        g = Graph("decoder", data=tmp / "model.onnx.data")  # weights go to disk as they are made
        add_shared_tensors(g, model, max_context)
        writer = LinearWriter(g, model, cfg.mode, cfg.weights, adapted, cfg.block_size)
        approximate = cfg.weights == "int4" and (any(map(writer.requantizes, writer.layers)) or any(
            quant.format_of(m.weight).approximate_in_onnx(m.weight) for m in writer.layers.values()))
        head_kind = head_format(cfg.head, approximate, trained_head(model, cfg.weights))
        rounding = _calibrate(cfg, writer, model, loaded.tokenizer, head_kind)
        head = HeadWriter(g, model, cfg.weights, head_kind, H=lambda: writer.hessians.pop(HEAD, None))
        build_decoder(spec, g, writer, head)
        meta = _metadata(cfg, loaded, info, spec, qcfg.base_name, writer, max_context)
        g.save(tmp / "model.onnx", f"qlora-rt {__version__}")
        meta.external_data = {"model.onnx.data": (tmp / "model.onnx.data").stat().st_size}  # a copy is checked
        loaded.tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        write_json(tmp / META, meta.to_json())
        adapter_file = None
        if cfg.mode == "adapter-aware" and cfg.adapter:
            adapter_file = write_adapter(adapter_arrays(cfg.adapter, meta)[1], tmp / ADAPTER_DIR / f"{cfg.name}{SUFFIX}", meta)
        export_s = time.perf_counter() - t0
        # int4 is held to the fp32 tolerance when nothing was requantized (an int4-trained base) and the
        # product is fp32; int8 activations are chaotic at the 1e-3 level (qlora_rt/int4.py): distributions
        exact = cfg.weights == "int4" and not writer.requant_err and qcfg.int4_compute == "fp32"
        # the calibration examples' distributions judge approximate exports; an exact one is judged by its
        # logits over the prompts and their continuations, and its KL there is reported
        judged_by_distributions = _tolerance(cfg, exact) == float("inf")
        samples = _samples(cfg, loaded.tokenizer) if judged_by_distributions else []
        report = {**verify(tmp, meta, model, loaded.tokenizer, adapter_file, samples=samples),
                  "export_seconds": export_s,
                  "base_quant": qcfg.format, "head": head.report,
                  "mode": cfg.mode, "weights": cfg.weights, "adapter": cfg.adapter,
                  "files_bytes": {p.name: p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}}
        if writer.requant_err:
            report["int4_relative_weight_error_mean"] = sum(writer.requant_err) / len(writer.requant_err)
            report["int4_rounding"] = f"{rounding}, block {'/'.join(map(str, sorted(writer.requant_blocks)))}"
        _judge(report, cfg, exact)
        write_json(tmp / "export_report.json", report)
    print(_summary(report, cfg), flush=True)
    return report


def _summary(r: dict, cfg: ExportConfig) -> str:
    size = sum(v for k, v in r["files_bytes"].items() if k.startswith("model.onnx")) / 2**20
    return table(f"export {cfg.out}", [
        ("mode / weights", f"{cfg.mode} / {cfg.weights}"),
        ("max |dlogit| vs PyTorch", f"{r['max_abs_logit_diff']:.2e} (tolerance "
                                    f"{r['tolerance'] or 'none: approximate, judged by its distributions'})"),
        ("int4 requantization", f"{r['int4_rounding']}: {100 * r['int4_relative_weight_error_mean']:.2f}% mean "
         "relative weight error" if "int4_relative_weight_error_mean" in r else "-"),
        ("mean |dlogit|", f"{r['mean_abs_logit_diff']:.2e}"), ("output head", r["head"]),
        ("next-token distributions", f"mean KL {r['mean_kl']:.2e}, top-1 agreement {100 * r['top1_agreement']:.1f}% "
                                     f"over {r['positions']} positions{_limits(r)}"),
        ("greedy agreement", f"{100 * r['greedy_agreement']:.1f}% over {r['greedy_new_tokens']} tokens, "
                             f"{r['greedy_identical_prompts']}/{r['prompts']} prompts identical"),
        ("model size", f"{size:,.1f} MiB"), ("export time", f"{r['export_seconds']:.1f} s"),
    ])



def _limits(r: dict) -> str:
    return f" (limits {r['max_kl']:g}, {100 * r['min_top1']:g}%)" if r["max_kl"] is not None else ""
