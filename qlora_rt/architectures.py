"""The decoder architectures, one record each: what differs between them, as data.

Every stage asks a model's record (loading a GGUF, the export's graph, the genai files, the docs' table)
instead of comparing architecture names: adding one is a record here, its tiny test checkpoint
(tests/test_architectures.py) and, where an op is truly new, one graph function in export/decoder_graph.py.
The record says *which* variant of each piece a model uses; the numbers (windows, RoPE bases, scales) come
from the checkpoint's own config, read once into the export's DecoderSpec. Torch-free: the runtime and the
docs read it too.
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
    embed_scale: bool = False       # the embedding is multiplied by sqrt(hidden) (Gemma)
    qk_norm: bool = False           # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    attention_scale: str | None = None  # the config field whose -1/2 power scales attention (None: head_dim)
    sliding_layers: bool = False    # `layer_types` in the config: sliding-window layers with their own RoPE
    gguf_qk_permuted: bool = False  # llama.cpp's converter interleaved q/k rows for its RoPE (Llama, Mistral)
    checked: str = ""               # what the fast tests hold it to (the docs' table)


LLAMA_CHECKS = "PEFT parity, both exports exact, generate/serve/genai/page greedy tokens (tiny checkpoints)"
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", gguf=("llama",), genai="llama", gguf_qk_permuted=True, checked=LLAMA_CHECKS),
    Architecture("mistral", gguf=("mistral",), genai="mistral", gguf_qk_permuted=True, checked=LLAMA_CHECKS),
    Architecture("qwen2", gguf=("qwen2",), genai="qwen2", checked=LLAMA_CHECKS),
    Architecture("qwen3", gguf=("qwen3",), genai="qwen3", qk_norm=True, checked=LLAMA_CHECKS),
    Architecture("gemma3_text", gguf=("gemma3",), genai="gemma3_text", norm_offset=1.0, sandwich_norms=True,
                 embed_scale=True, qk_norm=True, attention_scale="query_pre_attn_scalar", sliding_layers=True,
                 checked="PEFT parity, both exports exact past the sliding window, generate/serve (tiny "
                         "checkpoint); the real 270M GGUF against transformers' load of it"),
)}
BY_GGUF: dict[str, Architecture] = {g: a for a in ARCHITECTURES.values() for g in a.gguf}
# the gated MLP's activation, by the name transformers' config gives it -> the graph's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def architecture(model_type: str) -> Architecture:
    """The record of a transformers `model_type` or a GGUF `general.architecture` (KeyError if neither)."""
    return ARCHITECTURES[model_type] if model_type in ARCHITECTURES else BY_GGUF[model_type]
