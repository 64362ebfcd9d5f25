"""The decoder architectures, one record each: what differs between them, as data.

Every stage asks a model's record (loading a GGUF, the export's graph, the genai files, the docs' table)
instead of comparing architecture names: adding one is a record here, its tiny test checkpoint
(tests/test_architectures.py) and, where an op is truly new, one graph function in export/decoder_graph.py.
The record says *which* variant of each piece a model uses, naming the config fields that hold its numbers;
what every transformers config spells the same way is read from the config for any architecture: sliding
windows (`sliding_window`, per layer by `layer_types`), RoPE settings per layer type (`rope_parameters` keyed by
layer type), soft-caps (`attn_logit_softcapping`, `final_logit_softcapping`). The export reads it all once into
its DecoderSpec; training's loss computes the head's logits as the model's forward does (base/linears.py).
Torch-free, in the shared layer: families.py takes the decoder family's model types from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str                 # transformers' `model_type` (the manifest's)
    gguf: tuple[str, ...] = ()      # the GGUF `general.architecture` values that load as it
    genai: str | None = None        # onnxruntime-genai's model type ("type" in genai_config.json)
    norm_offset: float = 0.0        # RMSNorm scales by (offset + w): Gemma stores w - 1 (folded in at export)
    sandwich_norms: bool = False    # each sublayer's output is normed before the residual add (Gemma 2, 3)
    embed_scale: str | None = None  # the embedding times sqrt(hidden) ("sqrt_hidden", Gemma) or a config field
    qk_norm: bool = False           # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    # attention's scale: (config field, power) -> field ** power; None: head_dim ** -0.5
    attention_scale: tuple[str, float] | None = None
    residual_scale: str | None = None   # the config field each sublayer's output is multiplied by (Granite)
    logits_divisor: str | None = None   # the config field the logits are divided by (Granite)
    nope_layers: str | None = None      # the config field whose 0s mark layers without RoPE (SmolLM3)
    fused: bool = False             # q/k/v one Linear `qkv_proj`, gate/up one `gate_up_proj` (Phi-3)
    gguf_qk_permuted: bool = False  # llama.cpp's converter interleaved q/k rows for its RoPE (Llama, Mistral)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", gguf=("llama",), genai="llama", gguf_qk_permuted=True),
    Architecture("mistral", gguf=("mistral",), genai="mistral", gguf_qk_permuted=True),
    Architecture("qwen2", gguf=("qwen2",), genai="qwen2"),
    Architecture("qwen3", gguf=("qwen3",), genai="qwen3", qk_norm=True),
    Architecture("gemma2", gguf=("gemma2",), genai="gemma2", norm_offset=1.0, sandwich_norms=True,
                 embed_scale="sqrt_hidden", attention_scale=("query_pre_attn_scalar", -0.5)),
    Architecture("gemma3_text", gguf=("gemma3",), genai="gemma3_text", norm_offset=1.0, sandwich_norms=True,
                 embed_scale="sqrt_hidden", qk_norm=True, attention_scale=("query_pre_attn_scalar", -0.5)),
    Architecture("smollm3", genai="smollm3", nope_layers="no_rope_layers"),
    Architecture("phi3", genai="phi3", fused=True),
    Architecture("granite", genai="granite", embed_scale="embedding_multiplier",
                 attention_scale=("attention_multiplier", 1.0), residual_scale="residual_multiplier",
                 logits_divisor="logits_scaling"),
)}
BY_GGUF: dict[str, Architecture] = {g: a for a in ARCHITECTURES.values() for g in a.gguf}
# the gated MLP's activation, by the name transformers' config gives it -> the graph's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def architecture(model_type: str) -> Architecture:
    """The record of a transformers `model_type` or a GGUF `general.architecture` (KeyError if neither)."""
    return ARCHITECTURES[model_type] if model_type in ARCHITECTURES else BY_GGUF[model_type]


@dataclass(frozen=True)
class Numbers:
    """What a checkpoint's config sets for its architecture's variants, read once (None: not used)."""
    embed_scale: float | None        # the embedding's multiplier, in fp32 as transformers applies it
    attention_scale: float | None    # None: head_dim ** -0.5
    residual_scale: float | None
    logits_divisor: float | None
    attn_softcap: float | None       # scores -> tanh(scores / c) * c
    logit_softcap: float | None      # logits -> tanh(logits / c) * c
    windows: tuple[int, ...]         # per layer: a sliding window of this many positions, 0 = all; () = none
    rope: tuple[str | None, ...]     # per layer: the layer type whose RoPE it takes (None: the model's one
                                     # table), "" for a layer without RoPE; () = every layer the one table
    long_rope_from: int = 0          # LongRoPE: past this many positions the long factors (0: no LongRoPE)


def numbers(config) -> Numbers:
    """The numbers of `config` (a transformers config) for its architecture's record."""
    import numpy as np

    arch = ARCHITECTURES[config.model_type]

    def field(name: str | None) -> float | None:
        value = getattr(config, name, None) if name else None
        return None if value is None else float(value)

    embed = float(np.float32(config.hidden_size ** 0.5)) if arch.embed_scale == "sqrt_hidden" else \
        field(arch.embed_scale)
    scale = None if arch.attention_scale is None else field(arch.attention_scale[0]) ** arch.attention_scale[1]
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) or 0
    windows = () if not window else tuple(window if t == "sliding_attention" else 0 for t in types) if types \
        else (window,) * config.num_hidden_layers
    per_type = getattr(config, "rope_parameters", None) or {}
    rope: list[str | None] = [t if types and t in per_type else None for t in types] or \
        [None] * config.num_hidden_layers
    if arch.nope_layers:
        rope = [r if used else "" for r, used in zip(rope, getattr(config, arch.nope_layers))]
    long_from = per_type.get("original_max_position_embeddings", 0) if per_type.get("rope_type") == "longrope" else 0
    return Numbers(embed, scale, field(arch.residual_scale), field(arch.logits_divisor),
                   field("attn_logit_softcapping"), field("final_logit_softcapping"), windows,
                   () if all(r is None for r in rope) else tuple(rope), int(long_from))
