"""A BERT-family sequence classifier as an ONNX graph, built op by op from the weights (no tracing).

BERT/MiniLM, RoBERTa/XLM-R and DistilBERT share one post-norm block: self-attention, add & LayerNorm,
a GELU (or ReLU) MLP, add & LayerNorm. They differ in names, in positions (RoBERTa counts them from its
padding index, over the non-pad tokens) and in token types (BERT reads them). The head reads the first
token: BERT's pooler (dense + tanh) then its classifier; RoBERTa's dense + tanh + out_proj; DistilBERT's
pre_classifier + ReLU + classifier. ModernBERT is a pre-norm block of its own (`_modernbert`: rotary
positions, a fused q/k/v Linear, GeGLU, local layers that see a band of tokens) whose head pools the first
token or the mean, then dense + GELU + LayerNorm + classifier.

    inputs   input_ids (B, T) int64, attention_mask (B, T) int64, [token_type_ids (B, T) int64: BERT]
    outputs  logits (B, labels) float32, label_names (bytes) uint8: the labels' names as a JSON list

Hidden states are (B*T, d) rows, as in the decoder: every Linear goes through the `LinearWriter`
(export/weight_writers.py), which stores the weight (fp32, fp16, int4, NF4) and adds LoRA inputs in
adapter-aware exports. Attention is com.microsoft.MultiHeadAttention with an additive padding bias;
each residual add is fused with its LayerNorm (com.microsoft.SkipLayerNormalization).

The head is the task. Merged exports hold it as weights. In adapter-aware exports its weights, and the
label names, are graph inputs whose defaults are a head of zero labels: every `.onnx_adapter` brings its
LoRA, its head and its names, so one exported base serves several classifiers. The names pass through
to the `label_names` output, so a plain onnxruntime session with an active adapter gets them too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto, helper

from qlora_rt.base.encoders import head_modules, max_tokens, takes_token_types
from qlora_rt.errors import QloraError

from .graph import MS, Graph

ACTIVATIONS = {"gelu": ("Gelu", MS), "gelu_new": ("FastGelu", MS), "gelu_pytorch_tanh": ("FastGelu", MS),
               "gelu_fast": ("FastGelu", MS), "relu": ("Relu", "")}
BASES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert",
         "modernbert": "model"}  # the encoder's attribute in the classifier
LABEL_NAMES = "label_names"  # graph output; the input that feeds it is HEAD_LABELS
# com.microsoft.MultiHeadAttention / SkipLayerNormalization + Gelu, or the same arithmetic in standard ONNX ops
# (bench/encoder_ops.py measures each choice).
FUSED_ATTENTION = True
FUSED_NORM = True
HEAD_LABELS = "head.label_names"


@dataclass(frozen=True)
class EncoderSpec:
    model_type: str
    base: str           # the encoder's attribute in the classifier: bert / roberta / distilbert
    layers: int
    hidden: int
    heads: int
    eps: float
    act: str
    max_length: int     # positions the table holds (RoBERTa: after its padding offset)
    token_types: bool   # BERT reads token_type_ids
    pad_id: int
    pooling: str = "cls"            # the head reads the first token's state, or the mean over the tokens
    windows: tuple[int, ...] = ()   # ModernBERT: per layer, the tokens either side it sees (0: all)
    rope: tuple[str, ...] = ()      # ModernBERT: per layer, its rotary tables' name


def spec_of(model: torch.nn.Module) -> EncoderSpec:
    c = model.config
    kind = c.model_type
    base = BASES.get(kind)
    act = getattr(c, "hidden_act", None) or getattr(c, "activation", None)
    if base is None:
        raise QloraError(f"architecture {kind!r} is not supported by the encoder exporter; "
                         f"supported: {', '.join(BASES)}")
    if kind == "modernbert":
        act = c.hidden_activation
        if act not in ACTIVATIONS or c.classifier_activation not in ACTIVATIONS:
            raise QloraError(f"{kind}: activation {act!r} / {c.classifier_activation!r} is not supported by the "
                             f"exporter ({', '.join(ACTIVATIONS)})")
        return EncoderSpec(kind, base, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.norm_eps, act,
                           c.max_position_embeddings, False, c.pad_token_id or 0, c.classifier_pooling,
                           tuple(c.sliding_window if t == "sliding_attention" else 0 for t in c.layer_types),
                           tuple(f"rope.{t}" for t in c.layer_types))
    if act not in ACTIVATIONS:
        raise QloraError(f"{kind}: activation {act!r} is not supported by the exporter ({', '.join(ACTIVATIONS)})")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise QloraError(f"{kind}: position_embedding_type {c.position_embedding_type!r}: only absolute is supported")
    if kind == "distilbert":
        return EncoderSpec(kind, base, c.n_layers, c.dim, c.n_heads, 1e-12, act, c.max_position_embeddings, False,
                           c.pad_token_id or 0)
    return EncoderSpec(kind, base, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.layer_norm_eps, act,
                       max_tokens(c), takes_token_types(kind), c.pad_token_id or 0)


def layer_names(spec: EncoderSpec, i: int) -> dict[str, str]:
    """Module names of block i: q, k, v, o (attention), ln1, up, down, ln2."""
    if spec.base == "distilbert":
        p = f"distilbert.transformer.layer.{i}"
        return {"q": f"{p}.attention.q_lin", "k": f"{p}.attention.k_lin", "v": f"{p}.attention.v_lin",
                "o": f"{p}.attention.out_lin", "ln1": f"{p}.sa_layer_norm", "up": f"{p}.ffn.lin1",
                "down": f"{p}.ffn.lin2", "ln2": f"{p}.output_layer_norm"}
    p = f"{spec.base}.encoder.layer.{i}"
    return {"q": f"{p}.attention.self.query", "k": f"{p}.attention.self.key", "v": f"{p}.attention.self.value",
            "o": f"{p}.attention.output.dense", "ln1": f"{p}.attention.output.LayerNorm",
            "up": f"{p}.intermediate.dense",
            "down": f"{p}.output.dense", "ln2": f"{p}.output.LayerNorm"}


def add_shared_tensors(g: Graph, model: torch.nn.Module, spec: EncoderSpec) -> None:
    """Embedding tables and every LayerNorm's weight and bias, as initializers named as in the model (a head's
    own norm is the head's); ModernBERT's rotary tables, `rope.<layer type>.cos` / `.sin` (positions, hd/2)."""
    heads = tuple(f"{m}." for m in head_modules(model))
    for name, p in model.named_parameters():
        norm = "LayerNorm" in name or "layer_norm" in name or name.endswith(("norm.weight", "norm.bias"))
        if (".embeddings." in f".{name}" or norm) and not name.startswith(heads):
            g.init(name, p.detach().float().numpy())
    if spec.rope:
        positions = torch.arange(spec.max_length)[None]
        for table in dict.fromkeys(spec.rope):
            with torch.no_grad():  # the model's own rotary module, one table per layer type
                cos, sin = model.model.rotary_emb(torch.zeros(1), positions, table.removeprefix("rope."))
            half = cos.shape[-1] // 2
            g.init(f"{table}.cos", cos[0, :, :half].float().numpy())
            g.init(f"{table}.sin", sin[0, :, :half].float().numpy())


def _embeddings(g: Graph, spec: EncoderSpec) -> str:
    """(B*T, d): LayerNorm(word + position (+ token type))."""
    e = f"{spec.base}.embeddings"
    h = g.op("Gather", [f"{e}.word_embeddings.weight", "input_ids"])  # (B, T, d)
    if spec.base == "roberta":  # positions count the non-pad tokens, from padding_idx + 1
        real = g.op("Cast", [g.op("Not", [g.op("Equal", ["input_ids", g.const(spec.pad_id)])])], to=TensorProto.INT64)
        pos = g.op("Add", [g.op("Mul", [g.op("CumSum", [real, g.const(1)]), real]), g.const(spec.pad_id)])  # (B, T)
    else:
        pos = g.op("Range", [g.const(0), g.op("Squeeze", [g.op("Shape", ["input_ids"], start=1, end=2),
                                                          g.const([0])]), g.const(1)])  # (T,)
    h = g.op("Add", [h, g.op("Gather", [f"{e}.position_embeddings.weight", pos])])
    if spec.token_types:
        h = g.op("Add", [h, g.op("Gather", [f"{e}.token_type_embeddings.weight", "token_type_ids"])])
    elif spec.base == "roberta":  # one token type, always 0: its row is a constant
        h = g.op("Add", [h, g.op("Gather", [f"{e}.token_type_embeddings.weight", g.const(0)])])
    h = g.op("LayerNormalization", [h, f"{e}.LayerNorm.weight", f"{e}.LayerNorm.bias"], axis=-1, epsilon=spec.eps)
    return g.op("Reshape", [h, g.const([-1, spec.hidden])])


def _padding_bias(g: Graph, batch: str, length: str) -> str:
    """(B, 1, T, T) additive bias: 0 where the key is a token, -1e30 where it is padding."""
    keep = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2])])], to=TensorProto.BOOL)  # (B,1,1,T)
    bias = g.op("Where", [keep, g.const(0.0, np.float32), g.const(-1e30, np.float32)])
    return g.op("Expand", [bias, g.op("Concat", [batch, g.const([1]), length, length], axis=0)])


def _plain_attention(g: Graph, spec: EncoderSpec, q: str, k: str, v: str, bias: str) -> str:
    """softmax(q kᵀ / √hd + bias) v in standard ops, (B, T, d) in and out."""
    hd = spec.hidden // spec.heads
    heads = [g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, spec.heads, hd])])], perm=[0, 2, 1, 3])
             for t in (q, k, v)]  # (B, H, T, hd)
    scores = g.op("MatMul", [heads[0], g.op("Transpose", [heads[1]], perm=[0, 1, 3, 2])])  # (B, H, T, T)
    scores = g.op("Add", [g.op("Mul", [scores, g.const(hd ** -0.5, np.float32)]), bias])
    out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), heads[2]])  # (B, H, T, hd)
    return g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, spec.hidden])])


def _add_norm(g: Graph, spec: EncoderSpec, x: str, residual: str, norm: str) -> str:
    """LayerNorm(x + residual)."""
    if FUSED_NORM:
        return g.op("SkipLayerNormalization", [x, residual, f"{norm}.weight", f"{norm}.bias"], domain=MS,
                    epsilon=spec.eps)
    return g.op("LayerNormalization", [g.op("Add", [x, residual]), f"{norm}.weight", f"{norm}.bias"], axis=-1,
                epsilon=spec.eps)


def _layer(g: Graph, spec: EncoderSpec, lin, i: int, x: str, bias: str, rows3: str) -> str:
    n = layer_names(spec, i)
    q, k, v = (g.op("Reshape", [t, rows3]) for t in lin.many([n["q"], n["k"], n["v"]], x))  # (B, T, d) each
    if FUSED_ATTENTION:
        attn = g.op("MultiHeadAttention", [q, k, v, "", "", bias], domain=MS, num_heads=spec.heads)
    else:
        attn = _plain_attention(g, spec, q, k, v, bias)
    a = lin(n["o"], g.op("Reshape", [attn, g.const([-1, spec.hidden])]))
    x = _add_norm(g, spec, a, x, n["ln1"])
    op, domain = ACTIVATIONS[spec.act]
    if not FUSED_NORM and domain:  # the standard Gelu (opset 20): exact erf, or the tanh approximation
        act = g.op("Gelu", [lin(n["up"], x)], approximate="none" if op == "Gelu" else "tanh")
    else:
        act = g.op(op, [lin(n["up"], x)], domain=domain)
    return _add_norm(g, spec, lin(n["down"], act), x, n["ln2"])


def _layer_norm(g: Graph, spec: EncoderSpec, x: str, norm: str) -> str:
    """LayerNorm with the module's weight, and its bias where it has one (ModernBERT's have none: the input is
    left off, since onnxruntime 1.32 crashes on an empty-named optional B)."""
    bias = [f"{norm}.bias"] if f"{norm}.bias" in g.names else []
    return g.op("LayerNormalization", [x, f"{norm}.weight", *bias], axis=-1, epsilon=spec.eps)


def _band(g: Graph, length: str, window: int) -> str:
    """(1, 1, T, T) additive bias: -1e30 where query and key are more than `window` tokens apart."""
    r = g.op("Range", [g.const(0), g.op("Squeeze", [length, g.const([0])]), g.const(1)])  # (T,)
    apart = g.op("Abs", [g.op("Sub", [g.op("Unsqueeze", [r, g.const([1])]), g.op("Unsqueeze", [r, g.const([0])])])])
    far = g.op("Unsqueeze", [g.op("Greater", [apart, g.const(window)]), g.const([0, 1])])
    return g.op("Where", [far, g.const(-1e30, np.float32), g.const(0.0, np.float32)])


def _modernbert(g: Graph, spec: EncoderSpec, lin, bias: str, length: str, rows3: str) -> str:
    """ModernBERT's encoder, (B*T, d) after its final norm. A pre-norm block (layer 0 without the norm before
    attention), as transformers' ModernBertEncoderLayer:

        x ─┬─ norm ─ Wqkv ─ split ─ rotary(q, k) ─ MultiHeadAttention (+ band on local layers) ─ Wo ─(+)─┬─ ...
           └──────────────────────────────────────────────────────────────────────────────────────┘   │
           ┌──────────────────────────────────────────────────────────────────────────────────────────┘
           └─ norm ─ Wi ─ split(input, gate) ─ GELU(input) · gate ─ Wo ─(+)─> x
    """
    d, hd = spec.hidden, spec.hidden // spec.heads
    h = g.op("Gather", ["model.embeddings.tok_embeddings.weight", g.op("Reshape", ["input_ids", g.const([-1])])])
    x = _layer_norm(g, spec, h, "model.embeddings.norm")  # (B*T, d)
    bands = {w: g.op("Add", [bias, _band(g, length, w)]) for w in set(spec.windows) if w}
    act, domain = ACTIVATIONS[spec.act]
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        a = x if i == 0 else _layer_norm(g, spec, x, f"{p}.attn_norm")
        q, k, v = g.op("Split", [lin(f"{p}.attn.Wqkv", a), g.const([d, d, d])], outputs=3, axis=-1)
        q, k, v = (g.op("Reshape", [t, rows3]) for t in (q, k, v))  # (B, T, d)
        q, k = (g.op("RotaryEmbedding", [t, g.const([0]), f"{spec.rope[i]}.cos", f"{spec.rope[i]}.sin"], domain=MS,
                     interleaved=0, num_heads=spec.heads, rotary_embedding_dim=hd) for t in (q, k))
        attn = g.op("MultiHeadAttention", [q, k, v, "", "", bands.get(spec.windows[i], bias)], domain=MS,
                    num_heads=spec.heads)
        x = g.op("Add", [x, lin(f"{p}.attn.Wo", g.op("Reshape", [attn, g.const([-1, d])]))])
        up, gate = g.op("Split", [lin(f"{p}.mlp.Wi", _layer_norm(g, spec, x, f"{p}.mlp_norm")),
                                  g.const([lin.layers[f"{p}.mlp.Wi"].out_features // 2] * 2)], outputs=2, axis=-1)
        x = g.op("Add", [x, lin(f"{p}.mlp.Wo", g.op("Mul", [g.op(act, [up], domain=domain), gate]))])
    return _layer_norm(g, spec, x, "model.final_norm")


def _pool(g: Graph, spec: EncoderSpec, x: str, rows3: str) -> str:
    """(B, d): the first token's state ([CLS] / <s>), or the mean over the tokens the mask keeps."""
    x = g.op("Reshape", [x, rows3])  # (B, T, d)
    if spec.pooling == "cls":
        return g.op("Gather", [x, g.const(0)], axis=1)
    mask = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT), g.const([2])])  # (B, T, 1)
    total = g.op("ReduceSum", [g.op("Mul", [x, mask]), g.const([1])], keepdims=0)  # (B, d)
    return g.op("Div", [total, g.op("ReduceSum", [mask, g.const([1])], keepdims=0)])


def _io(g: Graph, spec: EncoderSpec) -> None:
    i64 = TensorProto.INT64
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.token_types else [])
    g.inputs += [helper.make_tensor_value_info(n, i64, ["batch", "sequence"]) for n in names]
    g.outputs += [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "labels"]),
                  helper.make_tensor_value_info(LABEL_NAMES, TensorProto.UINT8, ["label_bytes"])]


def build_encoder(spec: EncoderSpec, g: Graph, lin, head: HeadWriter) -> None:
    """Wire the encoder and its head into `g`; embeddings and LayerNorms must already be initializers."""
    _io(g, spec)
    batch = g.op("Shape", ["input_ids"], start=0, end=1)  # (1,) B
    length = g.op("Shape", ["input_ids"], start=1, end=2)  # (1,) T
    rows3 = g.op("Concat", [batch, length, g.const([-1])], axis=0)  # (B*T, n) -> (B, T, n)
    bias = _padding_bias(g, batch, length)
    if spec.rope:
        x = _modernbert(g, spec, lin, bias, length, rows3)
    else:
        x = _embeddings(g, spec)
        for i in range(spec.layers):
            x = _layer(g, spec, lin, i, x, bias, rows3)
    head(_pool(g, spec, x, rows3))


# The head's modules in the order they run: each a Linear and the activation after it (None: none), or a
# LayerNorm ("LayerNorm"). Keyed by the encoder's attribute (BASES); ModernBERT's is `model`.
HEAD_CHAIN = {"bert": (("bert.pooler.dense", "Tanh"), ("classifier", None)),
              "roberta": (("classifier.dense", "Tanh"), ("classifier.out_proj", None)),
              "distilbert": (("pre_classifier", "Relu"), ("classifier", None)),
              "model": (("head.dense", "gelu"), ("head.norm", "LayerNorm"), ("classifier", None))}


def head_arrays(tensors: dict[str, torch.Tensor], labels: list[str], base: str) -> dict[str, np.ndarray]:
    """A head's tensors ({model param name: tensor}) and label names as the graph's head inputs: each Linear's
    weight (out, in) as (in, out) for MatMul, a LayerNorm's as it is, their biases where they have them, and the
    names as UTF-8 JSON bytes."""
    out = {}
    for module, op in HEAD_CHAIN[base]:
        w = tensors[f"{module}.weight"].detach().float()
        out[f"head.{module}.weight"] = (w if op == "LayerNorm" else w.T).contiguous().numpy()
        if f"{module}.bias" in tensors:
            out[f"head.{module}.bias"] = tensors[f"{module}.bias"].detach().float().contiguous().numpy()
    out[HEAD_LABELS] = np.frombuffer(json.dumps(labels).encode(), np.uint8).copy()
    return out


class HeadWriter:
    """The classification head on the first token's hidden state. merged: its trained weights as initializers;
    adapter-aware: graph inputs (`head.<module>.weight` (in, out), `.bias`, `head.label_names`) whose
    defaults give zero labels, so each adapter brings its own (recorded in `inputs`: their fixed dims)."""

    def __init__(self, g: Graph, model: torch.nn.Module, spec: EncoderSpec, mode: str, labels: list[str]) -> None:
        self.g, self.spec, self.mode, self.labels = g, spec, mode, labels
        self.chain = HEAD_CHAIN[spec.base]
        names = {f"{m}.{k}" for m in head_modules(model) for k, _ in model.get_submodule(m).named_parameters()}
        self.tensors = {n: p for n, p in model.named_parameters() if n in names}
        self.inputs: dict[str, list] = {}  # adapter-aware: each head input's fixed dims (None: the label count)

    def __call__(self, x: str) -> str:
        g = self.g
        arrays = head_arrays(self.tensors, self.labels, self.spec.base)
        for i, (module, op) in enumerate(self.chain):
            w, b = f"head.{module}.weight", f"head.{module}.bias"
            last = i == len(self.chain) - 1
            for name in (w, b) if b in arrays else (w,):
                if self.mode == "adapter-aware":
                    self._input(name, arrays[name], TensorProto.FLOAT, last)
                else:
                    g.init(name, arrays[name])
            if op == "LayerNorm":
                x = g.op("LayerNormalization", [x, w, *([b] if b in arrays else [])], axis=-1, epsilon=self.spec.eps)
                continue
            x = g.op("MatMul", [x, w])
            if b in arrays:
                x = g.op("Add", [x, b])
            if op:
                kind, domain = ACTIVATIONS.get(op, (op, ""))  # a model's name for it (gelu), or an op (Tanh)
                x = g.op(kind, [x], domain=domain)
        g.op("Identity", [x], ["logits"])
        if self.mode == "adapter-aware":
            self._input(HEAD_LABELS, arrays[HEAD_LABELS], TensorProto.UINT8, True)
        else:
            g.init(HEAD_LABELS, arrays[HEAD_LABELS])
        g.op("Identity", [HEAD_LABELS], [LABEL_NAMES])
        return "logits"

    def _input(self, name: str, array: np.ndarray, dtype: int, per_task: bool) -> None:
        """An overridable input; the last Linear's (and the names') label dimension is symbolic, default 0."""
        if per_task:
            shape = list(array.shape[:-1]) + [0]
            dims = list(array.shape[:-1]) + ["labels" if name != HEAD_LABELS else "label_bytes"]
            default = np.zeros(shape, array.dtype)
        else:
            dims, default = list(array.shape), array
        self.g.init(name, default)
        self.g.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        self.inputs[name] = [d if isinstance(d, int) else None for d in dims]
