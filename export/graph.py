"""The Llama-family decoder as an ONNX graph, built op by op from the weights (no tracing).

Llama, Mistral, Qwen2, Qwen3 and SmolLM share one block: RMSNorm, rotary position embedding,
grouped-query attention with a KV cache, a SwiGLU MLP, a tied or untied head. Qwen2 adds q/k/v biases,
and Qwen3 adds per-head RMSNorm on q and k. The I/O follows onnxruntime-genai and Optimum:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.N.key / .value (B, kv_heads, P, head_dim)
    outputs  logits (B, T, vocab), present.N.key / .value (B, kv_heads, P+T, head_dim)

Every Linear goes through a `LinearWriter` (export/weights.py), which decides how the weight is stored
(fp32, fp16, MatMulNBits int4, MatMulBnb4 NF4) and whether a LoRA pair rides beside it as graph
inputs. This file knows nothing about weight formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS = "com.microsoft"


@dataclass(frozen=True)
class DecoderSpec:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    qk_norm: bool  # Qwen3


class Graph:
    """A thin helper over onnx.helper: nodes with generated names, initializers from numpy."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        self._n += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self._n}", domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))  # keeps 0-d
        return name

    def const(self, values: list | float | int, dtype=np.int64) -> str:
        key = (str(values), np.dtype(dtype).str)
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", np.array(values, dtype=dtype))
        return self._consts[key]

    def model(self, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "decoder", self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name=producer)
        m.ir_version = 10
        return m


def _rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def _add_norm(g: Graph, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(residual + x), residual + x) in one SkipSimplifiedLayerNormalization."""
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], outputs=4, domain=MS,
                               epsilon=eps)
    return normed, total


def _heads(g: Graph, x: str, n: int, hd: int) -> str:
    """(B, T, n*hd) -> (B, n, T, hd)"""
    return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, hd])])], perm=[0, 2, 1, 3])


def _rope(g: Graph, x: str, table: str) -> str:
    """Rotary embedding on (B, n, T, hd) at `position_ids`, rotate-half style as transformers does; `table`
    names a (max_positions, hd/2) cos/sin pair (com.microsoft.RotaryEmbedding: one op, not six)."""
    return g.op("RotaryEmbedding", [x, "position_ids", f"{table}.cos", f"{table}.sin"], domain=MS, interleaved=0)


def _attention_bias(g: Graph, attention_mask: str, input_ids: str) -> str:
    """(B, 1, 1, T, P+T) additive bias: 0 where query t may see key s (causal, not padding), else -inf-ish."""
    total = g.op("Shape", [attention_mask], start=1, end=2)  # (1,) P+T
    length = g.op("Shape", [input_ids], start=1, end=2)  # (1,) T
    past = g.op("Sub", [total, length])
    zero, one = g.const(0), g.const(1)
    scalar = lambda t: g.op("Squeeze", [t, g.const([0])])  # noqa: E731
    rows = g.op("Add", [g.op("Range", [zero, scalar(length), one]), past])  # (T,) absolute query positions
    cols = g.op("Range", [zero, scalar(total), one])  # (P+T,)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [cols, g.const([0])]),
                                  g.op("Unsqueeze", [rows, g.const([1])])])  # (T, P+T)
    keep = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])])], to=TensorProto.BOOL)  # (B,1,1,P+T)
    allowed = g.op("And", [keep, causal])  # (B, 1, T, P+T)
    bias = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)])
    return g.op("Unsqueeze", [bias, g.const([1])])  # (B, 1, 1, T, P+T): broadcast over kv heads and groups


def _attention(g: Graph, spec: DecoderSpec, lin, i: int, x: str, bias: str) -> str:
    p = f"model.layers.{i}.self_attn"
    q, k, v = lin.many([f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"], x)
    q, k, v = (_heads(g, t, n, spec.head_dim) for t, n in ((q, spec.heads), (k, spec.kv_heads), (v, spec.kv_heads)))
    if spec.qk_norm:
        q = _rms_norm(g, q, f"{p}.q_norm.weight", spec.eps)
        k = _rms_norm(g, k, f"{p}.k_norm.weight", spec.eps)
    q, k = _rope(g, q, "rope_q"), _rope(g, k, "rope")  # rope_q has 1/sqrt(hd) folded in
    k = g.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2)  # (B, kv, P+T, hd)
    v = g.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2)
    # grouped-query attention without copying k/v: each kv head's `groups` query heads are one batch dim
    groups = spec.heads // spec.kv_heads
    q = g.op("Reshape", [q, g.const([0, spec.kv_heads, groups, -1, spec.head_dim])])  # (B, kv, g, T, hd)
    k = g.op("Unsqueeze", [g.op("Transpose", [k], perm=[0, 1, 3, 2]), g.const([2])])  # (B, kv, 1, hd, P+T)
    v = g.op("Unsqueeze", [v, g.const([2])])  # (B, kv, 1, P+T, hd)
    scores = g.op("Add", [g.op("MatMul", [q, k]), bias])  # (B, kv, g, T, P+T)
    out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])  # (B, kv, g, T, hd)
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 3, 1, 2, 4]), g.const([0, 0, spec.heads * spec.head_dim])])
    return lin(f"{p}.o_proj", out)


def _mlp(g: Graph, lin, i: int, x: str) -> str:
    p = f"model.layers.{i}.mlp"
    gate, up = lin.many([f"{p}.gate_proj", f"{p}.up_proj"], x)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    return lin(f"{p}.down_proj", g.op("Mul", [silu, up]))


def _io(g: Graph, spec: DecoderSpec) -> None:
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    g.inputs += [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
                 helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
                 helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"])]
    g.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch", "sequence", spec.vocab]))
    for i in range(spec.layers):
        for kv in ("key", "value"):
            g.inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                          ["batch", spec.kv_heads, "past_sequence", spec.head_dim]))
            g.outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                           ["batch", spec.kv_heads, "total_sequence", spec.head_dim]))


def build_decoder(spec: DecoderSpec, g: Graph, lin, head) -> None:
    """Wire the whole decoder into `g`. `lin(name, x)` emits a Linear; `head(x)` emits the output head.

    Norm weights (`model.layers.N.input_layernorm.weight`, ...), `model.embed_tokens.weight` and the
    rotary tables `rope.cos` / `rope.sin` and `rope_q.cos` / `rope_q.sin` (max_positions, head_dim/2; the
    query's scaled by 1/sqrt(head_dim)) must already be initializers.
    """
    _io(g, spec)
    h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"])  # (B, T, d)
    bias = _attention_bias(g, "attention_mask", "input_ids")
    x = _rms_norm(g, h, "model.layers.0.input_layernorm.weight", spec.eps)
    for i in range(spec.layers):
        # each residual add is fused with the norm that follows it: x = norm(h += sublayer(x))
        after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < spec.layers else "model.norm.weight"
        x, h = _add_norm(g, _attention(g, spec, lin, i, x, bias), h, f"model.layers.{i}.post_attention_layernorm.weight",
                         spec.eps)
        x, h = _add_norm(g, _mlp(g, lin, i, x), h, after, spec.eps)
    head(x, "logits")
