"""The decoder family in the export flow (exporter.py): the Llama graph, its output head, its manifest, and
its self-check (verify.py: onnxruntime generates, PyTorch checks each choice)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qlora_rt import __version__
from qlora_rt.architectures import ACTIVATIONS, ARCHITECTURES, Architecture, numbers
from qlora_rt.base import formats
from qlora_rt.config import ExportConfig
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import lora_layers
from qlora_rt.merge import save_tokenizer
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.manifest import FORMAT, KV_CACHE, MIN_ONNXRUNTIME, MIN_ONNXRUNTIME_8BIT_GATHER, Manifest
from qlora_rt.train.text_data import load_examples
from qlora_rt.trained import TrainedModel

from .calibration import HEAD, calibration_data, hessians
from .decoder_graph import DecoderSpec, build_decoder
from .devices import write_device_files
from .graph import Graph
from .verify import verify
from .weight_writers import (
    HeadWriter,
    LinearWriter,
    add_shared_tensors,
    embedding_blocks,
    gather_blocks,
    head_format,
    linear_writer,
    trained_head,
)

MAX_ROPE_TABLE = 32768  # positions; longer contexts need a larger table (recorded as max_context)


def architecture_of(config) -> Architecture:
    if config.model_type not in ARCHITECTURES:
        raise QloraError(f"architecture {config.model_type!r} is not supported by the exporter yet; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[config.model_type]


def rope_tables(config) -> dict[str | None, str]:
    """The rotary tables' names by layer type: `rope` for the model's one table (None) or for full attention's,
    `rope.<type>` for another layer type's own RoPE settings (Gemma 3's sliding layers)."""
    kinds = dict.fromkeys(r for r in numbers(config).rope if r != "") or {None: None}
    return {t: "rope" if t in (None, "full_attention") else f"rope.{t}" for t in kinds}


def spec_of(config) -> DecoderSpec:
    """The architecture's record and the config's numbers, read once: what the graph builder needs."""
    arch, n = architecture_of(config), numbers(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise QloraError(f"{config.model_type}: the MLP's activation {act!r} is not supported by the exporter; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    tables = rope_tables(config)
    return DecoderSpec(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                       config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                       qk_norm=arch.qk_norm, sandwich_norms=arch.sandwich_norms, activation=ACTIVATIONS[act],
                       embed_scale=n.embed_scale, scale=n.attention_scale, residual_scale=n.residual_scale,
                       attn_softcap=n.attn_softcap, logit_softcap=n.logit_softcap, logits_divisor=n.logits_divisor,
                       windows=n.windows, rope=tuple("" if r == "" else tables[r] for r in n.rope),
                       rotary_dim=rotary_dim(config, head_dim), long_rope_from=long_rope_from(config),
                       fused=arch.fused)


def rotary_dim(config, head_dim: int) -> int:
    """The dims of a head that rotate: all, or partial_rotary_factor of them (Phi-4-mini: 0.75)."""
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * factor) if factor != 1.0 else 0


def long_rope_from(config) -> int:
    """LongRoPE's switch length where an export's context can pass it (else one set of tables does)."""
    n = numbers(config).long_rope_from
    return n if n and min(config.max_position_embeddings, MAX_ROPE_TABLE) > n else 0


class DecoderFamily:
    name = "decoder"

    def __init__(self, cfg: ExportConfig, trained: TrainedModel) -> None:
        self.cfg, self.trained = cfg, trained
        self.model = trained.loaded.model.eval()
        self.spec = replace(spec_of(self.model.config), kv_fp16=cfg.kv_cache == "fp16")
        self.max_context = min(self.model.config.max_position_embeddings, MAX_ROPE_TABLE)
        self.head_kind = "fp32"
        self.head: HeadWriter | None = None
        self.embed_blocks: dict | None = None

    def start(self, g: Graph) -> LinearWriter:
        cfg, model, info = self.cfg, self.model, self.trained.adapter
        # adapter-aware: LoRA inputs on the trained adapter's modules, or on every Linear for a bare base
        adapted = set(info.modules) if info else set(lora_layers(model))
        writer = linear_writer(g, model, cfg.mode, cfg.weights, adapted, cfg.block_size, row_slots=True,
                               requant_bits=cfg.requant_bits,
                               int4_compute=cfg.int4_compute)
        int8 = cfg.int4_compute == "int8" if cfg.int4_compute else any(
            formats.format_of(m.weight).approximate_in_onnx(m.weight) for m in writer.layers.values())
        approximate = cfg.weights == "int4" and (any(map(writer.requantizes, writer.layers)) or int8)
        self.head_kind = "dynamic" if cfg.weights == "int8" and cfg.head == "auto" else \
            head_format(cfg.head, approximate, trained_head(model, cfg.weights))
        # the embedding as stored (8-bit blocks) where the export is 8- or 4-bit and no fp32 head reads the table
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        self.embed_blocks = embedding_blocks(model) if cfg.weights in ("int4", "int8") and not (
            tied and self.head_kind == "fp32") else None
        add_shared_tensors(g, model, self.max_context, architecture_of(model.config).norm_offset,
                           rope_tables(model.config), long_rope_from(model.config), embedding=not self.embed_blocks)
        return writer

    def calibration_targets(self, writer: LinearWriter) -> set[str]:
        return {n for n in writer.layers if writer.requantizes(n)} | ({HEAD} if self.head_kind == "int4" else set())

    def hessians(self, writer: LinearWriter, data: Path, names: set[str]):
        return hessians(self.model, self.trained.loaded.tokenizer, data, names)  # a layer at a time while writing

    def build(self, g: Graph, writer: LinearWriter) -> None:
        self.head = HeadWriter(g, self.model, self.cfg.weights, self.head_kind,
                               H=lambda: writer.hessians.pop(HEAD, None), int4_compute=self.cfg.int4_compute)
        blocks = self.embed_blocks
        build_decoder(self.spec, g, writer, self.head,
                      embed=(lambda ids: gather_blocks(g, ids, blocks, self.spec.hidden)) if blocks else None)

    def manifest(self, writer: LinearWriter) -> Manifest:
        loaded, info, spec, cfg = self.trained.loaded, self.trained.adapter, self.spec, self.cfg
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else loaded.tokenizer.eos_token_id
        return Manifest(format=FORMAT, version=__version__, family="decoder", task="causal-lm", mode=cfg.mode,
                        weights=cfg.weights, model_type=self.model.config.model_type, layers=spec.layers,
                        hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                        vocab=spec.vocab, max_context=self.max_context,
                        eos_token_ids=eos if isinstance(eos, list) else [eos],
                        pad_token_id=loaded.tokenizer.pad_token_id, base_model=loaded.source,
                        base_fingerprint=loaded.fingerprint, base_quant=self.trained.quant.base_name,
                        # PiSSA/LoftQ: the digest of the residual base the adapter was trained on (lora/svd_init.py)
                        base_residual=info.metadata.get("base.residual") if info else None, kv_cache=KV_CACHE,
                        inputs=[io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, io.PAST_KEY.replace("%d", "N"),
                                io.PAST_VALUE.replace("%d", "N"), io.LOGITS_TO_KEEP, io.ROW_LENGTHS],
                        outputs=[io.LOGITS, io.PRESENT_KEY.replace("%d", "N"), io.PRESENT_VALUE.replace("%d", "N")],
                        lora_inputs=writer.lora_inputs, lora_groups=writer.lora_groups,
                        int4_activations=("fp32" if 0 in writer.accuracy_levels else "int8")
                        if writer.accuracy_levels else None,
                        min_onnxruntime=MIN_ONNXRUNTIME_8BIT_GATHER if self.embed_blocks else MIN_ONNXRUNTIME,
                        chat_template=loaded.tokenizer.chat_template is not None,
                        long_rope_from=spec.long_rope_from or None,
                        kv_cache_dtype="float16" if spec.kv_fp16 else "float32")

    def save_files(self, folder: Path, meta: Manifest) -> None:
        tokenizer = self.trained.loaded.tokenizer
        save_tokenizer(tokenizer, folder, [io.INPUT_IDS, io.ATTENTION_MASK])
        if self.model.generation_config is not None:
            self.model.generation_config.save_pretrained(folder)
        write_device_files(folder, meta, self.model, tokenizer)

    def exact(self, writer: LinearWriter) -> bool:
        # int8 activations are chaotic at the 1e-3 level (qlora_rt/base/packed_int4.py): never exact; nor is
        # attention over an fp16 cache
        return not writer.requant_err and not writer.requant8_err and self.trained.quant.int4_compute == "fp32" \
            and self.cfg.int4_compute in (None, "fp32") and not self.spec.kv_fp16

    def check(self, folder: Path, meta: Manifest, adapter_file: Path | None, distributions: bool) -> dict:
        # the calibration examples' distributions judge approximate exports; an exact one is judged by its
        # logits over the prompts and their continuations (its KL there is reported)
        samples = self._samples() if distributions else []
        report = verify(folder, meta, self.model, self.trained.loaded.tokenizer, adapter_file, samples=samples)
        return {**report, "head": self.head.report, "what_agrees": "next-token distributions"}

    def _samples(self, n: int = 16, seq_len: int = 256) -> list[list[int]]:
        """Token ids of a few calibration examples: the check compares next-token distributions on them."""
        data = calibration_data(self.cfg)
        tokenizer = self.trained.loaded.tokenizer
        return [e.input_ids for e in load_examples(data, tokenizer, seq_len)[0][:n]] if data else []

    def summary_rows(self, r: dict) -> list[tuple[str, object]]:
        return [("output head", r["head"]),
                ("greedy agreement", f"{100 * r['greedy_agreement']:.1f}% over {r['greedy_new_tokens']} tokens, "
                                     f"{r['greedy_identical_prompts']}/{r['prompts']} prompts identical")]
