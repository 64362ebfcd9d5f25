"""The decoder as an ONNX graph, built op by op from the weights (no tracing).

Every architecture (qlora_rt/architectures.py) is this one block with its variants as data in the
DecoderSpec: RMSNorm (Gemma's 1 + w folded into the weights), rotary position embedding (one table, or one
per layer type), grouped-query attention with a KV cache (sliding-window layers, a scale of their own),
a gated MLP (SiLU or tanh-GELU), optional per-head q/k norms (Qwen3, Gemma 3), optional norms on each
sublayer's output (Gemma's "sandwich"), an embedding scale, a tied or untied head; Gemma 2's soft-caps,
Granite's residual multiplier and logits divisor, SmolLM3's layers without RoPE, Phi-3's fused q/k/v and
gate/up Linears, LongRoPE and partial rotary; Qwen2's q/k/v biases are the Linears'. The I/O follows
onnxruntime-genai and Optimum:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.N.key / .value (B, kv_heads, P, head_dim)
    outputs  logits (B, T, vocab), present.N.key / .value (B, kv_heads, P+T, head_dim)

Inside, hidden states are (B*T, d) rows: every Linear is a 2-D product, so a LoRA pair's output is
added by the Gemm that computes it (its C input) instead of a separate Add; only attention sees
(B, T, ·), through one Reshape each side.

Batches may be left-padded (this project's runtime) or right-padded (onnxruntime-genai): see `_mask`.
Attention is one com.microsoft.GroupQueryAttention a layer (rotary, KV append,
masks, softmax). Fed a max-length buffer bound as both past and present (what the runtime does), it
appends in place and present keeps the buffer's length; fed plain arrays, it returns P+T rows.
position_ids drive rotary only where it is done outside the op (Qwen3); elsewhere they are accepted
and unused, so both kinds of graph take the same feeds.

Every Linear goes through a `LinearWriter` (export/weight_writers.py), which decides how the weight is stored
(fp32, fp16, MatMulNBits int4, MatMulBnb4 NF4) and whether a LoRA pair rides beside it as graph
inputs. This file knows nothing about weight formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.graph_io import ROW_LENGTHS

from .graph import MS, Graph


@dataclass(frozen=True)
class DecoderSpec:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    qk_norm: bool = False                # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False         # each sublayer's output normed before its residual add (Gemma)
    activation: str = "silu"             # the MLP's gate: silu | gelu_tanh
    embed_scale: float | None = None     # the embedding times this (Gemma: sqrt(hidden), in fp32)
    scale: float | None = None           # attention's; None: head_dim ** -0.5
    residual_scale: float | None = None  # each sublayer's output times this before its residual add (Granite)
    attn_softcap: float | None = None    # attention scores -> tanh(s / c) * c (Gemma 2)
    logit_softcap: float | None = None   # logits -> tanh(l / c) * c (Gemma 2)
    logits_divisor: float | None = None  # logits / this (Granite)
    windows: tuple[int, ...] = ()        # per layer: a sliding window of this many positions, 0 = all
    rope: tuple[str, ...] = ()           # per layer: its rotary tables' name, "" for none (`rope` if empty)
    rotary_dim: int = 0                  # dims of a head that rotate (partial rotary, Phi-4-mini); 0: all
    long_rope_from: int = 0              # LongRoPE: past this total length, the long tables (0: one set)
    fused: bool = False                  # q/k/v one Linear `qkv_proj`, gate/up one `gate_up_proj` (Phi-3)
    kv_fp16: bool = False                # the KV cache (past/present) in fp16: attention runs in fp16

    def window(self, i: int) -> int:
        return self.windows[i] if self.windows else 0

    def rope_of(self, i: int) -> str:
        return self.rope[i] if self.rope else "rope"


def _rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def _add_norm(g: Graph, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(residual + x), residual + x) in one SkipSimplifiedLayerNormalization."""
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], outputs=4, domain=MS,
                               epsilon=eps)
    return normed, total


def _rope(g: Graph, x: str, n: int, hd: int, table: str = "rope", rotary_dim: int = 0) -> str:
    """Rotary embedding of (B, T, n*hd) at `position_ids`, rotate-half style as transformers does (one
    com.microsoft.RotaryEmbedding op over the `<table>.cos` / `<table>.sin` (max_positions, rot/2) tables)."""
    return g.op("RotaryEmbedding", [x, "position_ids", f"{table}.cos", f"{table}.sin"], domain=MS, interleaved=0,
                num_heads=n, rotary_embedding_dim=rotary_dim or hd)


def _long_rope(g: Graph, spec: DecoderSpec, tables: set[str]) -> None:
    """LongRoPE (Phi-3.x), as transformers computes it: every position of a sequence takes the long factors
    once the sequence (P+T) passes the original length, the short ones before.

        P+T ─> Greater(·, from) ─┐
        <t>.long.cos[:P+T]  ─────┼─ Where ─> <t>.cos    (and .sin alike)
        <t>.short.cos[:P+T] ─────┘

    Only the rows a run can read are sliced, so the choice costs P+T rows a run, not the whole table."""
    total = g.op("Shape", [io.ATTENTION_MASK], start=1, end=2)  # (1,) P+T
    longer = g.op("Greater", [g.op("Squeeze", [total, g.const([0])]), g.const(spec.long_rope_from, np.int64)])
    for table in tables:
        for part in ("cos", "sin"):
            rows = [g.op("Slice", [f"{table}.{kind}.{part}", g.const([0]), total, g.const([0])])
                    for kind in ("long", "short")]
            g.op("Where", [longer, *rows], [f"{table}.{part}"])


def _head_norm(g: Graph, x: str, weight: str, n: int, hd: int, eps: float) -> str:
    """The per-head RMSNorm of (B, T, n*hd) (Qwen3, Gemma 3)."""
    heads = g.op("Reshape", [x, g.const([0, 0, n, hd])])  # (B, T, n, hd)
    return g.op("Reshape", [_rms_norm(g, heads, weight, eps), g.const([0, 0, n * hd])])


def _mask(g: Graph, attention_mask: str, batch: str, length: str, fp16: bool = False) -> tuple[str, str, str]:
    """What GroupQueryAttention takes in place of a mask: seqlens_k (B,) int32, each row's last cache
    position; total_sequence_length () int32, P+T; an additive bias (B, 1, T, P+T) (the op applies the
    causal mask itself).

    One graph takes both ways of padding a batch:
    - left-padded rows (Optimum, transformers.js): [0 0 1 1 1]; the row's cache spans every position, its
      leading pads hidden by the bias. The op's rotary takes a token's position from its cache row, so a
      padded row's tokens sit as many places further on as it has pads: rotary attention depends only on
      the distance between query and key, which that shift does not change.
    - right-padded rows (onnxruntime-genai): [1 1 0] for a prompt, then [1 1 0 1 ...] as it decodes; the
      mask counts the row's tokens, which the op keeps at cache positions 0 .. count-1 (a new token goes
      over the pad's slot), as genai's own builder computes it.
    So seqlens_k = (ones in the row) + (its leading zeros) - 1, and the bias hides leading zeros only.

    `row_lengths` (B,) int64, when fed, says instead that each row's cache holds its own number of
    positions from the start (rows without padding: qlora-rt's runtime, runtime/decode.py): row b's
    new tokens go to its positions row_lengths[b]-T .. row_lengths[b]-1, at their true rotary positions.
    Its default [-1] means "not fed"."""
    total = g.op("Shape", [attention_mask], start=1, end=2)  # (1,) P+T
    lengths = g.init(ROW_LENGTHS, np.array([-1], np.int64))
    # its own dim, not the batch's: the default is [-1] whatever the batch
    g.inputs.append(helper.make_tensor_value_info(lengths, TensorProto.INT64, [ROW_LENGTHS]))
    given = g.op("Less", [g.const([0]), lengths])
    started = g.op("Less", [g.const(0, np.int64), g.op("CumSum", [attention_mask, g.const(1)])])  # (B, P+T) bool
    counted = g.op("ReduceSum", [g.op("Cast", [started], to=TensorProto.INT64), g.const([1])], keepdims=0)
    ones = g.op("ReduceSum", [attention_mask, g.const([1])], keepdims=0)  # (B,)
    own = g.op("Sub", [g.op("Add", [ones, g.op("Squeeze", [total, g.const([0])])]), counted])  # ones + leading 0s
    seqlens = g.op("Where", [given, lengths, own])
    seqlens = g.op("Cast", [g.op("Sub", [seqlens, g.const([1])])], to=TensorProto.INT32)
    keep = g.op("Unsqueeze", [started, g.const([1, 2])])  # (B,1,1,P+T)
    # not the type's min: the op adds the score to it, and a row of -inf would be NaN (fp16: its largest)
    kind = np.float16 if fp16 else np.float32
    bias = g.op("Where", [keep, g.const(0.0, kind), g.const(-65504.0 if fp16 else -1e30, kind)])
    bias = g.op("Expand", [bias, g.op("Concat", [batch, g.const([1]), length, total], axis=0)])  # (B,1,T,P+T)
    total = g.op("Cast", [g.op("Squeeze", [total, g.const([0])])], to=TensorProto.INT32)
    return seqlens, total, bias


def _attention(g: Graph, spec: DecoderSpec, lin, i: int, x: str, mask: tuple[str, str, str], rows3: str) -> str:
    """One com.microsoft.GroupQueryAttention: rotary, the KV-cache append, causal + padding mask, softmax
    attention with kv heads shared by their query groups. q/k/v come packed as one (B, T, (n+2kv)*hd)
    tensor when the Linears were one product. Passing the same buffer as past and present (I/O binding,
    max-length cache) makes the append in place: the runtime does that; plain feeds work too. x is
    (B*T, d); `rows3` is the shape (B, T, -1) the op's inputs take."""
    p = f"model.layers.{i}.self_attn"
    names = [f"{p}.qkv_proj"] if spec.fused else [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"]
    table, hd = spec.rope_of(i), spec.head_dim  # table "": a layer without RoPE (SmolLM3's every 4th)
    if spec.qk_norm:  # per-head norms go before rotary, which the CPU op cannot do inside
        q, k, v = (g.op("Reshape", [t, rows3]) for t in lin.many(names, x))
        q = _head_norm(g, q, f"{p}.q_norm.weight", spec.heads, hd, spec.eps)
        k = _head_norm(g, k, f"{p}.k_norm.weight", spec.kv_heads, hd, spec.eps)
        if table:
            q = _rope(g, q, spec.heads, hd, table, spec.rotary_dim)
            k = _rope(g, k, spec.kv_heads, hd, table, spec.rotary_dim)
        qkv, rotary = [q, k, v], 0
    else:  # one (B, T, (n+2kv)*hd) tensor: the op's packed form, and a fused qkv_proj's own layout
        qkv, rotary = [g.op("Reshape", [lin.many(names, x, packed=True)[0], rows3])], int(bool(table))
    table = table or "rope"  # the op takes its tables as inputs even where it does no rotary
    cos, sin = f"{table}.cos", f"{table}.sin"
    if spec.kv_fp16:  # the op takes its inputs in the cache's type (a table's cast is folded at load)
        qkv = [g.op("Cast", [t], to=TensorProto.FLOAT16) for t in qkv]
        cos, sin = (g.op("Cast", [t], to=TensorProto.FLOAT16) for t in (cos, sin))
    seqlens, total, bias = mask
    past = [io.PAST_KEY % i, io.PAST_VALUE % i]
    # a sliding window of w positions: the query and the w - 1 before it, as transformers' sliding_window = w
    # (the op's local_window_size is the same count: tests/test_architectures.py decodes past it)
    extra = {"local_window_size": spec.window(i)} if spec.window(i) else {}
    if spec.attn_softcap:
        extra["softcap"] = spec.attn_softcap
    out, _, _ = g.op("GroupQueryAttention", [*qkv, *[""] * (3 - len(qkv)), *past, seqlens, total, cos, sin, "", bias],
                     [f"attn_{i}", *map(io.present_of, past)], domain=MS, num_heads=spec.heads,
                     kv_num_heads=spec.kv_heads, do_rotary=rotary, rotary_interleaved=0,
                     scale=spec.scale or hd ** -0.5, **extra)
    if spec.kv_fp16:
        out = g.op("Cast", [out], to=TensorProto.FLOAT)
    return lin(f"{p}.o_proj", g.op("Reshape", [out, g.const([-1, spec.heads * spec.head_dim])]))


def _mlp(g: Graph, spec: DecoderSpec, lin, i: int, x: str) -> str:
    """down(act(gate(x)) * up(x)), act SiLU or tanh-GELU (transformers' gelu_pytorch_tanh: Gelu-20's tanh form)."""
    p = f"model.layers.{i}.mlp"
    if spec.fused:  # gate_up_proj: gate's rows, then up's (transformers' chunk(2))
        half = lin.layers[f"{p}.gate_up_proj"].out_features // 2
        gate, up = g.op("Split", [lin(f"{p}.gate_up_proj", x), g.const([half, half])], outputs=2, axis=-1)
    else:
        gate, up = lin.many([f"{p}.gate_proj", f"{p}.up_proj"], x)
    if spec.activation == "gelu_tanh":
        act = g.op("Gelu", [gate], approximate="tanh")
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    return lin(f"{p}.down_proj", g.op("Mul", [act, up]))


def _io(g: Graph, spec: DecoderSpec) -> None:
    """Inputs and outputs, with genai's builder's and Optimum's names for them and for their dimensions."""
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    g.inputs += [helper.make_tensor_value_info(io.INPUT_IDS, i64, [io.BATCH, io.SEQUENCE]),
                 helper.make_tensor_value_info(io.ATTENTION_MASK, i64, [io.BATCH, io.TOTAL_SEQUENCE]),
                 helper.make_tensor_value_info(io.POSITION_IDS, i64, [io.BATCH, io.SEQUENCE])]
    # logits of the last N positions only (0, the default: all): a prompt needs its last one, and the head is
    # then one row's product instead of T rows' (the runtime binds 1; the self-check reads them all)
    g.init(io.LOGITS_TO_KEEP, np.array(0, np.int64))
    g.inputs.append(helper.make_tensor_value_info(io.LOGITS_TO_KEEP, i64, []))
    g.outputs.append(helper.make_tensor_value_info(io.LOGITS, f32, [io.BATCH, "logits_sequence_length", spec.vocab]))
    kv = TensorProto.FLOAT16 if spec.kv_fp16 else f32
    for past, present in zip(io.past_names(spec.layers), map(io.present_of, io.past_names(spec.layers))):
        g.inputs.append(helper.make_tensor_value_info(past, kv, [io.BATCH, spec.kv_heads, io.PAST_SEQUENCE,
                                                                 spec.head_dim]))
        g.outputs.append(helper.make_tensor_value_info(present, kv, [io.BATCH, spec.kv_heads, io.TOTAL_SEQUENCE,
                                                                     spec.head_dim]))


def build_decoder(spec: DecoderSpec, g: Graph, lin, head, embed=None) -> None:
    """Wire the whole decoder into `g`. `lin(name, x)` emits a Linear; `head(x)` emits the output head;
    `embed(ids)` the embedding rows of the (n,) token ids (default: a Gather from `model.embed_tokens.weight`).

    Norm weights (`model.layers.N.input_layernorm.weight`, ...), `model.embed_tokens.weight` (unless `embed`
    reads the table otherwise) and the rotary tables `rope.cos` / `rope.sin` (max_positions, head_dim/2) must
    already be initializers.
    """
    _io(g, spec)
    batch = g.op("Shape", [io.INPUT_IDS], start=0, end=1)  # (1,) B
    length = g.op("Shape", [io.INPUT_IDS], start=1, end=2)  # (1,) T
    rows3 = g.op("Concat", [batch, length, g.const([-1])], axis=0)  # (B*T, n) -> (B, T, n)
    ids = g.op("Reshape", [io.INPUT_IDS, g.const([-1])])
    h = embed(ids) if embed else g.op("Gather", ["model.embed_tokens.weight", ids])  # (B*T, d)
    if spec.embed_scale is not None:
        h = g.op("Mul", [h, g.const(spec.embed_scale, np.float32)])
    mask = _mask(g, io.ATTENTION_MASK, batch, length, spec.kv_fp16)
    if spec.long_rope_from:
        _long_rope(g, spec, {spec.rope_of(i) for i in range(spec.layers)} - {""})
    x = _rms_norm(g, h, "model.layers.0.input_layernorm.weight", spec.eps)
    for i in range(spec.layers):
        # each residual add is fused with the norm that follows it: x = norm(h += sublayer(x)); with sandwich
        # norms the sublayer's output is normed first, and the norm before the MLP is pre_feedforward_layernorm
        p = f"model.layers.{i}."
        after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < spec.layers else "model.norm.weight"
        a = _attention(g, spec, lin, i, x, mask, rows3)
        if spec.sandwich_norms:
            a = _rms_norm(g, a, p + "post_attention_layernorm.weight", spec.eps)
        if spec.residual_scale is not None:
            a = g.op("Mul", [a, g.const(spec.residual_scale, np.float32)])
        x, h = _add_norm(g, a, h, p + ("pre_feedforward_layernorm.weight" if spec.sandwich_norms else
                                       "post_attention_layernorm.weight"), spec.eps)
        m = _mlp(g, spec, lin, i, x)
        if spec.sandwich_norms:
            m = _rms_norm(g, m, p + "post_feedforward_layernorm.weight", spec.eps)
        if spec.residual_scale is not None:
            m = g.op("Mul", [m, g.const(spec.residual_scale, np.float32)])
        x, h = _add_norm(g, m, h, after, spec.eps)
    start = g.op("Neg", [g.op("Reshape", [io.LOGITS_TO_KEEP, g.const([1])])])  # (1,): -N, and 0 for all
    kept = g.op("Slice", [g.op("Reshape", [x, rows3]), start, g.const([2**62]), g.const([1])])  # (B, N or T, d)
    g.op("Identity", [_logits(g, spec, head(kept))], [io.LOGITS])


def _logits(g: Graph, spec: DecoderSpec, x: str) -> str:
    """What the model's forward does to the head's output: Granite's divisor, Gemma 2's soft-cap."""
    if spec.logits_divisor is not None:
        x = g.op("Div", [x, g.const(spec.logits_divisor, np.float32)])
    if spec.logit_softcap:
        cap = g.const(spec.logit_softcap, np.float32)
        x = g.op("Mul", [g.op("Tanh", [g.op("Div", [x, cap])]), cap])
    return x
