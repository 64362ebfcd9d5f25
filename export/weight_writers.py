"""How each Linear of the trained model becomes ONNX: the weight format, and LoRA as graph inputs.

    merged         W' = dequantize(W4) + s·B·A (fp32, NaN-checked), stored as fp32 | fp16 | int4
    adapter-aware  the base as trained: nf4 = the very NF4/FP4 bytes in com.microsoft.MatMulBnb4
                   (bit-identical base), int4 = an int4-trained base's own bytes in MatMulNBits (any other
                   base requantized, error reported), fp32 | fp16 = dequantized;
                   each adapted Linear, or group of Linears reading one input (q/k/v, gate/up), gets
                   graph inputs `<name>.lora_A` (r, in) and `<name>.lora_B` (r, out) with s folded
                   into B, whose rank-0 initializers mean "no adapter" by default; a group whose outputs
                   are used apart (gate/up) takes one B per member Linear (`LinearWriter._lora`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import TensorProto, helper

from qlora_rt.base import formats
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import lora_layers
from qlora_rt.merge import merge_weight
from qlora_rt.runtime import graph_io as io

from . import int4_weights as int4
from .graph import MS, Graph

MODES = ("merged", "adapter-aware")
INT4_ACCURACY = 4  # MatMulNBits computes with int8-quantized activations: the fast CPU path


def lora_input_names(name: str) -> tuple[str, str]:
    return f"{name}.lora_A", f"{name}.lora_B"


# Zero rows added below x·Aᵀ before its ·B product, so that the product never runs on fewer than 4 rows:
# onnxruntime's fp32 MatMul on inputs that are not constants takes another path for one row than for several,
# and splits 2 or 3 rows otherwise across threads, so a row's term rounded otherwise alone than in a batch
LORA_PAD_ROWS = 3


def lora_arrays(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in) and B (out, r) as the graph takes them: A as it is (PEFT's layout) and (s·B)ᵀ (r, out), fp32."""
    return (A.detach().float().contiguous().numpy(),
            (B.detach().float() * scale).T.contiguous().numpy())


def linear_writer(g: Graph, model: torch.nn.Module, mode: str, weights: str, adapted: set[str],
                  block_size: int | None = None, hessians: dict[str, torch.Tensor] | None = None,
                  row_slots: bool = False, int4_compute: str | None = None,
                  requant_bits: str = "stored") -> LinearWriter:
    """The LinearWriter of one --weights (WRITERS) for one --mode. int4_compute: how the trained int4 bytes'
    products are computed (fp32 or int8 activations); None: as trained. requant_bits: a requantized weight in
    its base's bits (stored) or in 4."""
    if mode not in MODES or weights not in WRITERS:
        raise QloraError(f"--mode {mode} --weights {weights}: not supported; modes {', '.join(MODES)}, "
                         f"weights {', '.join(WRITERS)}")
    writer = WRITERS[weights](g, model, mode, adapted, block_size, hessians, row_slots)
    writer.int4_compute = int4_compute
    writer.requant_bits = requant_bits
    return writer


ACCURACY = {"int8": 4, "fp32": 0}  # MatMulNBits accuracy_level of each int4 compute


def accuracy_level(state: int4.Int4, int4_compute: str | None) -> int:
    """The accuracy_level of trained int4 bytes: as this export computes them, else as they were trained."""
    return ACCURACY[int4_compute or state.compute]


class LinearWriter:
    """Called as `lin(name, x)` by the graph builder, or `lin.many(names, x)` for Linears sharing their
    input; emits their nodes and returns the outputs. What is the same for every weight format lives here:
    the adapter folded in (merged) or the LoRA inputs (adapter-aware), biases, splitting a shared product.
    Each --weights is a subclass (WRITERS) that writes the products themselves (`products`)."""

    weights: str = ""  # the --weights this class writes

    def __init__(self, g: Graph, model: torch.nn.Module, mode: str, adapted: set[str],
                 block_size: int | None = None, hessians: dict[str, torch.Tensor] | None = None,
                 row_slots: bool = False) -> None:
        self.g, self.mode, self.block_size = g, mode, block_size
        self.requant_err: list[float] = []  # int4: relative Frobenius error of each requantized weight
        self.requant_blocks: set[int] = set()  # ... and the block sizes they were rounded in
        self.requant8_err: list[float] = []  # ... those rounded to 8 bits (an 8-bit base's, --requant-bits stored)
        self.requant_bits = "stored"
        self.layers = lora_layers(model)
        self.adapted = adapted  # the Linears that get LoRA inputs in adapter-aware mode
        self._sums: dict = {}  # block sums of an input, for GGUF Q4_1 corrections
        self.hessians = hessians or {}  # int4 requantization by GPTQ where a layer has one (export/calibration.py)
        self.lora_inputs: dict[str, list] = {}  # adapter-aware: each LoRA input's fixed dims (metadata)
        self.lora_groups: dict[str, list] = {}  # ... and the Linears each grouped pair covers
        self.row_slots = row_slots  # adapter-aware decoders: each batch row may take its own adapter (_lora)
        self.accuracy_levels: set[int] = set()  # of the MatMulNBits written (HeadWriter adds the head's)
        self.int4_compute: str | None = None  # the trained int4 bytes' products: fp32|int8 activations, or as trained

    def products(self, names: list[str], x: str) -> list[str]:
        """x times each Linear's base weight: one output per Linear, or one over all of them side by side."""
        raise NotImplementedError

    def requantizes(self, name: str) -> bool:
        """Whether this Linear's weight is rounded to int4 here rather than copied from training."""
        return False

    def _float_weight(self, name: str) -> torch.Tensor:
        """The base as trained, in fp32, with the adapter folded in when merging."""
        layer = self.layers[name]
        w = formats.dequantize(layer.weight)
        if self.mode == "merged" and layer.rank:
            w = merge_weight(w, layer.lora_A.weight, layer.lora_B.weight, layer.scale, name)
        return w

    def __call__(self, name: str, x: str) -> str:
        return self.many([name], x)[0]

    def many(self, names: list[str], x: str, packed: bool = False) -> list[str]:
        """The outputs of Linears that all read `x` (q/k/v, gate/up), each with its bias and (adapter-aware)
        LoRA added. They are computed as one product where the format allows, and their LoRA pairs as one
        pair (`_lora`). packed=True returns their (rows, Σout) output whole instead of split (one product's
        output as it is; separate products concatenated)."""
        ys = self.products(names, x)
        sizes = [self.layers[n].out_features for n in names]
        bias = self._bias(names)
        lora = None
        if self.mode == "adapter-aware" and self.adapted.intersection(names):
            lora = self._lora(names, x, per_member=not packed)
        whole = lora is not None and len(lora[1]) == 1  # one B over the group's outputs side by side
        if len(ys) == 1:  # one product: add the group's bias (and a whole-group LoRA) once, then split
            y = ys[0]
            if bias:
                y = self.g.op("Add", [y, bias])
            if whole:
                y = self.g.op("Add", [y, self._times_b(*lora[0], *lora[1])])
            if packed or len(names) == 1:
                return [y]
            ys = list(self.g.op("Split", [y, self.g.const(sizes)], outputs=len(names), axis=-1))
        else:
            extra = [bias, self._times_b(*lora[0], *lora[1]) if whole else None]
            for e in filter(None, extra):  # separate products: split what is added to them
                parts = self.g.op("Split", [e, self.g.const(sizes)], outputs=len(names), axis=-1)
                ys = [self.g.op("Add", [y, part]) for y, part in zip(ys, parts)]
        if lora is not None and not whole:  # each member's x·A_m·B_m + y_m
            ys = [self.g.op("Add", [y, self._times_b(xa, b)]) for xa, b, y in zip(*lora, ys)]
        if packed:  # members that could not share one product (weights of different formats) side by side again
            return [self.g.op("Concat", ys, axis=-1)]
        return ys

    def _bias(self, names: list[str]) -> str | None:
        biases = [self.layers[n].bias for n in names]
        if all(b is None for b in biases):
            return None
        full = [b.detach().float() if b is not None else torch.zeros(self.layers[n].out_features)
                for n, b in zip(names, biases)]
        return self.g.init(f"{group_name(names)}.bias", torch.cat(full).numpy())

    def _lora(self, names: list[str], x: str, per_member: bool = False) -> tuple[list[str], list[str]]:
        """([x·Aᵀ], [B]) for a group of Linears reading x, with A (r, in) and B (r, Σout) overridable graph
        inputs: an adapter's pairs for the group's Linears sit stacked in A and block-diagonally in B
        (`group_lora`), so q/k/v cost two small products, not six. Rank-0 defaults give zeros.

        per_member (a group whose outputs the graph uses apart, e.g. gate/up): one B per member Linear,
        `<member>.lora_B` (r, out_m), and x·Aᵀ split into the members' equal column blocks, so no product
        reads the zero blocks of a block-diagonal B (half of gate/up's bytes). Returns the M column blocks
        and the M Bs. (q/k/v feeding a packed attention keep one B: one product into the packed output costs
        less than three and a Concat at small batch.)

        row_slots: several adapters may be fed at once, their A and their B stacked along their ranks (per
        member: member-major), with `<group>.lora_mask` (B*T, R) holding 1 where rank r belongs to the adapter
        of token row i and 0 elsewhere: x·Aᵀ is masked to each row's own ranks, so each row gets
        its own adapter's x·A·B in the same products (a base row: all zeros). The runtime makes the masks
        (one per column layout, shared by the groups that have it); the default, ones (1, 1), is one adapter
        for every row: a single adapter fed as before needs none.

        A row's result never depends on the rows beside it. onnxruntime's fp32 MatMul on inputs that are not
        constants rounds a row of x·A otherwise alone than beside others (one row takes another path, 2-3 rows
        split otherwise across threads) and a column otherwise where A is wider (adapters stacked), so a row's
        reply changed with the batch. Hence x·Aᵀ is taken as (A·xᵀ)ᵀ, the rows as the columns of a product
        onnxruntime fuses into one FusedMatMul (transB), which rounds each the same whatever their number or
        A's height; and ·B on at least 4 rows (`_times_b`; measured on 1..16 rows, 1 and 2 threads;
        tests/test_prefix_cache.py checks whole replies)."""
        group = group_name(names)
        per_member = per_member and len(names) > 1
        a_name, b_name = lora_input_names(group)
        k = self.layers[names[0]].in_features
        # one rank symbol per group: an adapter may target some layers (rank r) and not others (rank 0),
        # and a shared symbol lets onnxruntime's memory planner assume they are equal
        rank = f"{group}.rank"
        self._lora_input(a_name, rank, k)
        if per_member:
            bs = [lora_input_names(m)[1] for m in names]
            for m, b in zip(names, bs):
                self._lora_input(b, f"{group}.member_rank", self.layers[m].out_features)
        else:
            bs = [b_name]
            self._lora_input(b_name, rank, sum(self.layers[m].out_features for m in names))
        if len(names) > 1:
            self.lora_groups[group] = [[m, self.layers[m].out_features] for m in names]
        g = self.g
        xa = g.op("Transpose", [g.op("MatMul", [a_name, g.op("Transpose", [x], perm=[1, 0])])], perm=[1, 0])
        if self.row_slots:  # (rows, R)
            mask = g.init(group + io.LORA_MASK, np.ones((1, 1), np.float32))
            g.inputs.append(helper.make_tensor_value_info(mask, TensorProto.FLOAT, ["lora_rows", rank]))
            xa = g.op("Mul", [xa, mask])  # (rows, R)
        if per_member:
            return self._split_equal(xa, a_name, len(names)), bs
        return [xa], bs

    def _split_equal(self, xa: str, a_name: str, m: int) -> list[str]:
        """xa (rows, R) in m equal column blocks, with the sizes spelled out: Split(num_outputs=m) is refused
        by older onnxruntime builds (node 1.30, web) when R is the rank-0 default.

            Shape(A)[0:1] ─► Div m ─► Expand (m,) ─► Split(xa, sizes) ─► m × (rows, R/m)
        """
        g = self.g
        width = g.op("Div", [g.op("Shape", [a_name], start=0, end=1), g.const([m])])  # (1,) R/m
        sizes = g.op("Expand", [width, g.const([m])])  # (m,)
        return list(g.op("Split", [xa, sizes], outputs=m, axis=-1))

    def _times_b(self, xa: str, b: str) -> str:
        """xa (rows, R) · B (R, out), taken on LORA_PAD_ROWS zero rows more and cut back to (rows, out).
        (B·xaᵀ, the rows as columns, also rounds each row alike, but one row took 12.7 µs against 7.3 here
        for a 576 -> 1728 B: a one-column product; the row-wise product without the rows added took 4.1.)
        A Gemm, not a MatMul: onnxruntime-web's WebGPU MatMul fails on the rank-0 default (R = 0)."""
        g = self.g
        padded = g.op("Pad", [xa, g.const([0, 0, LORA_PAD_ROWS, 0])])
        return g.op("Slice", [g.op("Gemm", [padded, b]), g.const([0]), g.const([-LORA_PAD_ROWS]), g.const([0])])

    def _lora_input(self, name: str, rows: int | str, cols: int | str) -> None:
        """An overridable (rows, cols) LoRA input, one dimension a rank symbol, whose rank-0 default is no
        adapter; its fixed dimension is recorded for the adapter check (`lora_inputs`)."""
        self.g.init(name, np.zeros([0 if isinstance(d, str) else d for d in (rows, cols)], np.float32))
        self.g.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, cols]))
        self.lora_inputs[name] = [None if isinstance(d, str) else d for d in (rows, cols)]


class FloatWriter(LinearWriter):
    """--weights fp32: the trained base dequantized (and the adapter folded in, merged) as MatMul weights."""

    weights = "fp32"

    def products(self, names: list[str], x: str) -> list[str]:
        """One fp32/fp16 MatMul over the Linears' weights side by side (in, Σout)."""
        w = torch.cat([self._float_weight(n) for n in names])  # (Σout, in)
        return [self.g.op("MatMul", [x, self._weight(group_name(names), w)])]

    def _weight(self, name: str, w: torch.Tensor) -> str:
        """A (out, in) fp32 weight stored as (in, out) for MatMul."""
        return self.g.init(f"{name}.weight", w.detach().T.contiguous().numpy())


class Fp16Writer(FloatWriter):
    """--weights fp16: as fp32, stored in half the bytes."""

    weights = "fp16"

    def _weight(self, name: str, w: torch.Tensor) -> str:
        """Stored in fp16 (half the bytes), cast to fp32 once at session load."""
        wt = w.detach().T.contiguous().numpy().astype(np.float16)
        return self.g.op("Cast", [self.g.init(f"{name}.weight_fp16", wt)], to=1)


class Int8Writer(LinearWriter):
    """--weights int8: each weight rounded to int8 per output column (symmetric, to nearest), its input to int8
    per row, multiplied by MatMulInteger (`int8_product`). onnxruntime-web's wasm build runs MatMulInteger with
    SIMD kernels, where it has no 4-bit kernel (MatMulNBits is dequantized every call there): the page's format.
    Approximate (requantized weights, int8 activations)."""

    weights = "int8"

    def products(self, names: list[str], x: str) -> list[str]:
        """One product over the Linears' weights side by side (in, Σout)."""
        w = torch.cat([self._float_weight(n) for n in names])  # (Σout, in)
        inputs, _, err = int4.int8_head(w, w.shape[1])  # one block a row: per-column scales
        self.requant8_err.append(err)
        return [int8_product(self.g, group_name(names), x, inputs)]

    def requantizes(self, name: str) -> bool:
        return True


def int8_product(g: Graph, name: str, x: str, inputs: dict[str, np.ndarray]) -> str:
    """x (any rank, last K) times a weight held as `int8_head`'s one-block rows ((N, 1, K) codes + 128, (N, 1)
    scales): each row of x rounded to int8 on its own scale (max |x| / 127, symmetric: a row's product does
    not depend on the rows beside it), MatMulInteger with the int8 codes (K, N), then the row's scale times
    each column's. (onnxruntime's DynamicQuantizeLinear takes one scale for the whole tensor: SmolLM2's
    activation outliers then cost a mean KL of 0.67 against PyTorch, 0.06 per row.)"""
    n = inputs["scales"].shape[0]
    codes = (inputs["qweight"].reshape(n, -1).astype(np.int16) - 128).astype(np.int8).T  # (K, N)
    peak = g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1])], keepdims=1)
    xs = g.op("Max", [g.op("Div", [peak, g.const(127.0, np.float32)]), g.const(1e-30, np.float32)])
    # held as uint8 around 128 (one zero point for every row): the uint8 x int8 kernels are the fast ones
    xq = g.op("Cast", [g.op("Add", [g.op("Round", [g.op("Div", [x, xs])]), g.const(128.0, np.float32)])],
              to=TensorProto.UINT8)
    y = g.op("MatMulInteger", [xq, g.init(f"{name}.weight_int8", np.ascontiguousarray(codes)),
                               g.const(128, np.uint8)])
    scale = g.op("Mul", [xs, g.init(f"{name}.weight_scale", inputs["scales"].reshape(n).astype(np.float32))])
    return g.op("Mul", [g.op("Cast", [y], to=TensorProto.FLOAT), scale])


class Int4Writer(LinearWriter):
    """--weights int4: MatMulNBits. An adapter-aware export of an int4-trained base copies the trained bytes
    (exact); anything else is requantized here (GPTQ where calibration gave an H, `hessians`)."""

    weights = "int4"

    def products(self, names: list[str], x: str) -> list[str]:
        """MatMulNBits for Linears that read the same x (q/k/v, gate/up): one node over their stacked rows
        when their formats agree (fewer, larger products), else one node each."""
        parts = [self._nbits(n) for n in names]
        if len(names) > 1 and self._fusable(names):
            axis = {"correction": 1}  # (kb, N); every other input has N first
            inputs = {k: np.concatenate([i[k] for i, _, _ in parts], axis=axis.get(k, 0)) for k in parts[0][0]}
            return [self._emit_nbits(group_name(names), x, inputs, parts[0][1], parts[0][2])]
        return [self._emit_nbits(n, x, i, s, acc) for n, (i, s, acc) in zip(names, parts)]

    def _nbits(self, name: str) -> tuple[dict[str, np.ndarray], int4.Int4, int]:
        """One Linear's MatMulNBits inputs, int4 state and accuracy level: the trained int4 bytes as they
        are, or the (merged) float weight requantized (GPTQ where calibration gave an H)."""
        if not self.requantizes(name):
            packed, s = self._trained_nbits(name)
            return int4.nbits_inputs(packed, s), s, accuracy_level(s, self.int4_compute)
        w = self._float_weight(name)
        if self._requant_bits(name) == 8:  # an 8-bit base (a GGUF's 5-, 6-, 8-bit tensor) stays 8-bit: symmetric,
            # to nearest, block 32 (GPTQ's error feedback buys little at 8 bits)
            self.hessians.pop(name, None)
            inputs, _, err = int4.int8_head(w, 32)
            self.requant8_err.append(err)
            return inputs, int4.Int4(torch.from_numpy(inputs["scales"]), None, None, w.shape[1], 32, bits=8), \
                INT4_ACCURACY
        inputs, s, err = int4.requantize(w, self.requant_block(name), self.hessians.pop(name, None))
        self.requant_err.append(err)
        return inputs, s, INT4_ACCURACY

    def _requant_bits(self, name: str) -> int:
        own = self._trained_nbits(name)
        return 8 if self.requant_bits == "stored" and own is not None and own.state.bits == 8 else 4

    def requant_block(self, name: str) -> int:
        """The block a requantized weight is rounded in: --block-size, else 32, or twice the base's block where
        the base is int4 on an integer grid (its own grid would round a merged weight back onto the base)."""
        own = self._trained_nbits(name)
        block = self.block_size or (min(2 * own.state.block, 256) if own and own.state.mins is None else 32)
        self.requant_blocks.add(block)
        return block

    def _fusable(self, names: list[str]) -> bool:
        """Whether these Linears' int4 products can be one MatMulNBits: same K, block, bits, accuracy, inputs."""
        kinds = set()
        for n in names:
            s = None if self.requantizes(n) else self._trained_nbits(n).state
            kinds.add((s.K, s.block, s.bits, accuracy_level(s, self.int4_compute), s.zeros is None, s.mins is None)
                      if s else ("requantized", self._requant_bits(n)))
        return len(kinds) == 1

    def _emit_nbits(self, name: str, x: str, inputs: dict[str, np.ndarray], s: int4.Int4, accuracy: int) -> str:
        self.accuracy_levels.add(accuracy)
        return nbits_product(self.g, name, x, inputs, s, accuracy, self._sums)

    def _trained_nbits(self, name: str) -> formats.NBitsBytes | None:
        """The trained base's own MatMulNBits form (its format has one: the int4 format), or None."""
        w = self.layers[name].weight
        return formats.format_of(w).nbits(w)

    def requantizes(self, name: str) -> bool:
        """Whether this Linear's int4 weight is rounded here rather than copied from training."""
        return not (self.mode == "adapter-aware" and self._trained_nbits(name) is not None)


class Nf4Writer(LinearWriter):
    """--weights nf4: MatMulBnb4 over the trained NF4/FP4 bytes (adapter-aware only; a merged weight is no
    longer the trained base)."""

    weights = "nf4"

    def products(self, names: list[str], x: str) -> list[str]:
        """MatMulBnb4 over the trained NF4/FP4 bytes; Linears whose blocks do not straddle their ends (each
        weight a whole number of blocks) are one node over the concatenated bytes, which is the same thing."""
        parts = [self._trained_bnb4(n) for n in names]
        first = parts[0]
        whole = all(p.packed.numel() * 2 % p.block == 0 and (p.quant_type, p.block) == (first.quant_type, first.block)
                    for p in parts)
        groups = [names] if whole else [[n] for n in names]
        part = dict(zip(names, parts))
        out, g = [], self.g
        for group in groups:
            packed = np.concatenate([part[n].packed.numpy() for n in group])
            absmax = np.concatenate([part[n].absmax.numpy() for n in group])
            name = group_name(group)
            out.append(g.op("MatMulBnb4", [x, g.init(f"{name}.qweight", packed), g.init(f"{name}.absmax", absmax)],
                            domain=MS, K=self.layers[group[0]].in_features,
                            N=sum(self.layers[n].out_features for n in group), block_size=first.block,
                            quant_type=first.quant_type))
        return out

    def _trained_bnb4(self, name: str) -> formats.Bnb4Bytes:
        w = self.layers[name].weight
        found = formats.format_of(w).bnb4(w)
        if found is None:
            raise QloraError(f"--weights nf4 needs a base trained in nf4 or fp4 ({name} is "
                             f"{formats.format_of(w).describe(w)})")
        return found


WRITERS: dict[str, type[LinearWriter]] = {c.weights: c for c in (FloatWriter, Fp16Writer, Int8Writer, Int4Writer,
                                                                   Nf4Writer)}


def group_lora(pairs: dict[str, tuple[np.ndarray, np.ndarray]], groups: dict[str, list],
               inputs: dict[str, list] | None = None) -> dict[str, np.ndarray]:
    """Per-Linear LoRA pairs {name: (A (r, in), B (r, out))} as the graph's inputs: the pairs of a group's
    Linears (export metadata `lora_groups`: {group: [[name, out], ...]}) become one A stacked, and one
    block-diagonal B, or, where the export takes one B per member (`inputs`, its `lora_inputs`, name
    `<member>.lora_B`), a B per member with every member's block of A the same height (a Linear the adapter
    leaves out, or gives a smaller rank, is padded with zeros). A Linear the adapter leaves out gets zero
    columns in a block-diagonal B."""
    out: dict[str, np.ndarray] = {}
    grouped = {m for members in groups.values() for m, _ in members}
    for name, (A, B) in pairs.items():
        if name not in grouped:
            out.update(zip(lora_input_names(name), (A, B)))
    for group, members in groups.items():
        present = [m for m, _ in members if m in pairs]
        if not present:
            continue
        for m, o in members:
            if m in pairs and pairs[m][1].shape[1] != o:
                raise QloraError(f"adapter: {m}.lora_B has {pairs[m][1].shape[1]} outputs, this export "
                                 f"expects {o}: it was made for another model")
        if inputs is not None and f"{members[0][0]}.lora_B" in inputs:  # one B per member
            r = max(pairs[m][1].shape[0] for m in present)
            k = pairs[present[0]][0].shape[1]
            A = np.zeros((r * len(members), k), np.float32)
            for j, (m, o) in enumerate(members):
                Bm = np.zeros((r, o), np.float32)
                if m in pairs:
                    a, b = pairs[m]
                    A[j * r: j * r + a.shape[0]] = a
                    Bm[: b.shape[0]] = b
                out[f"{m}.lora_B"] = Bm
            out[f"{group}.lora_A"] = A
            continue
        A = np.concatenate([pairs[m][0] for m in present], axis=0)  # (Σr, in)
        B = np.zeros((A.shape[0], sum(o for _, o in members)), np.float32)  # (Σr, Σout)
        row, col = 0, 0
        for m, o in members:
            if m in pairs:
                r = pairs[m][1].shape[0]
                B[row:row + r, col:col + o] = pairs[m][1]
                row += r
            col += o
        out.update(zip(lora_input_names(group), (A, B)))
    return out


def matmul_nbits(g: Graph, name: str, x: str, inputs: dict[str, np.ndarray], K: int, bits: int, block: int,
                 accuracy: int, weight: str = "qweight") -> str:
    """One com.microsoft.MatMulNBits over `inputs` (qweight, scales, optional zero_points) as initializers
    named `<name>.<key>`; N is the scales' first dimension."""
    args = [x, g.init(f"{name}.{weight}", inputs["qweight"]), g.init(f"{name}.scales", inputs["scales"])]
    if "zero_points" in inputs:
        args.append(g.init(f"{name}.zero_points", inputs["zero_points"]))
    return g.op("MatMulNBits", args, domain=MS, K=K, N=inputs["scales"].shape[0], bits=bits, block_size=block,
                accuracy_level=accuracy)


def nbits_product(g: Graph, name: str, x: str, inputs: dict[str, np.ndarray], s: int4.Int4, accuracy: int,
                  sums: dict, rows: bool = True) -> str:
    """x times a trained (or requantized) weight in MatMulNBits at its own bits and block; a weight with float
    minimums (GGUF Q4_1, Q5_1, Q4_K, Q5_K) adds (block sums of x) @ (zero·scale + min). `sums` keeps each
    input's block sums, made once (q/k/v and gate/up share theirs). rows: x is (rows, K), as inside the decoder
    layers; else of any rank (the head's (batch, sequence, K))."""
    if s.bits == 8 and accuracy == 0:  # fp32 activations: two fast 4-bit products, exactly the 8-bit weight
        hi, lo = int4.nibble_halves(inputs)
        y = g.op("Add", [matmul_nbits(g, f"{name}.hi", x, hi, s.K, 4, s.block, 0),
                         matmul_nbits(g, f"{name}.lo", x, lo, s.K, 4, s.block, 0)])
    else:
        y = matmul_nbits(g, name, x, inputs, s.K, s.bits, s.block, accuracy)
    if "correction" not in inputs:
        return y
    correction = g.init(f"{name}.correction", inputs["correction"])
    if not rows:  # x @ (K, kb) ones-per-block: block sums of an input of any rank
        kb = -(-s.K // s.block)
        ones = np.kron(np.eye(kb, dtype=np.float32), np.ones((s.block, 1), np.float32))[:s.K]
        return g.op("Add", [y, g.op("MatMul", [g.op("MatMul", [x, g.init(f"{name}.block_ones", ones)]), correction])])
    key = (x, s.block)
    if key not in sums:
        blocks = g.op("Reshape", [x, g.const([0, -1, s.block])])  # (rows, kb, block)
        sums[key] = g.op("ReduceSum", [blocks, g.const([-1])], keepdims=0)
    return g.op("Gemm", [sums[key], correction, y])


def group_name(names: list[str]) -> str:
    """model.layers.0.self_attn.q_proj_k_proj_v_proj for fused q/k/v; a single Linear keeps its own name."""
    return names[0] if len(names) == 1 else names[0].rpartition(".")[0] + "." + "_".join(
        n.rpartition(".")[2] for n in names)


def embedding_blocks(model: torch.nn.Module) -> dict[str, np.ndarray] | None:
    """The input embedding as 8-bit blocks with a scale each, where it is stored so (a GGUF's Q8_0, or a 5- or
    6-bit type kept in 8): its own bytes, or the output head's where the head holds the same table (a GGUF's
    tied `token_embd`, untied for --quant-head: its dequantized bytes equal the embedding exactly, checked).
    MatMulNBits-layout inputs (`qweight` (N, blocks, block), `scales`, maybe `zero_points`), which
    GatherBlockQuantized reads exactly at a quarter of the fp32 table's bytes. None for any other embedding."""
    table = model.get_input_embeddings()
    emb, head = table.weight, model.get_output_embeddings()
    same_shape = head is not None and (head.out_features, head.in_features) == (table.num_embeddings,
                                                                                table.embedding_dim)
    for w in (emb, head.weight if same_shape else None):  # (a quantized weight's shape is its bytes')
        if w is None or not formats.is_quantized(w):
            continue
        stored = formats.format_of(w).nbits(w)
        if stored is None or stored[1].bits != 8:
            continue
        inputs = int4.nbits_inputs(*stored)
        if "correction" in inputs:
            continue
        if w is emb or torch.equal(formats.dequantize(w), emb.detach().float()):
            return inputs
    return None


def gather_blocks(g: Graph, ids: str, inputs: dict[str, np.ndarray], K: int) -> str:
    """Rows `ids` (n,) of an 8-bit block-quantized table (`embedding_blocks`) as (n, K) fp32: GatherBlockQuantized
    over the (N, blocks, block) bytes, each block scaled along its last axis (MatMulNBits' 8-bit default zero
    point, 128, where the table has none). The bytes are an initializer of their own even where the head
    multiplies by the same ones: onnxruntime reads an initializer only its Gather uses from the mapped file, a
    page as a row is asked for, where one the head's MatMulNBits shares is held whole in memory (SmolLM2-135M:
    28 MB more resident, for 28 MB less on disk)."""
    N, blocks, block = inputs["qweight"].shape
    operands = [g.init("model.embed_tokens.qweight", inputs["qweight"]), ids,
                g.init("model.embed_tokens.scales", inputs["scales"].reshape(N, blocks, 1))]
    if "zero_points" in inputs:
        operands.append(g.init("model.embed_tokens.zero_points", inputs["zero_points"].reshape(N, blocks, 1)))
    rows = g.op("GatherBlockQuantized", operands, domain=MS, bits=8, block_size=block, gather_axis=0,
                quantize_axis=2)  # (n, blocks, block)
    rows = g.op("Reshape", [rows, g.const([-1, blocks * block])])
    return rows if blocks * block == K else g.op("Slice", [rows, g.const([0]), g.const([K]), g.const([1])])


def add_shared_tensors(g: Graph, model: torch.nn.Module, max_positions: int, norm_offset: float = 0.0,
                       rope_tables: dict[str | None, str] | None = None, long_rope_from: int = 0,
                       embedding: bool = True) -> None:
    """Embedding, norms and the rotary tables, as initializers the graph refers to by name.

    norm_offset: added to every RMSNorm weight (Gemma's norms scale by 1 + w; the sum is the one transformers
    computes in fp32, so folding it in is exact). rope_tables: the table name for each layer type (None: a
    model with one rotary table), each `<name>.cos` / `<name>.sin` (max_positions, rotary_dim/2); partial
    rotary (Phi-4-mini) makes rotary_dim < head_dim. long_rope_from (LongRoPE, Phi-3.x): the model's own
    rotary module switches to its long factors for every position once a sequence passes this length, so two
    tables go in, `<name>.long.*` and `<name>.short.*` (short factors up to that length, the long rows after:
    never read), and the graph picks one a run (decoder_graph._long_rope). embedding: False where the graph reads
    the embedding from its stored blocks instead (`gather_blocks`)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            g.init(name, (p.detach().float() + norm_offset).numpy())
        elif name == "model.embed_tokens.weight" and embedding:
            g.init(name, p.detach().float().numpy())
    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions)[None]  # (1, P)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer_type, table in (rope_tables or {None: "rope"}).items():
        kw = {} if layer_type is None else {"layer_type": layer_type}
        with torch.no_grad():  # the model's own rotary module: every rope type/scaling it knows is honoured
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions, **kw)
            if long_rope_from:  # the same module, asked for a sequence within the original length
                short = rotary(torch.zeros(1, dtype=torch.float32), positions[:, :long_rope_from], **kw)
        half = cos.shape[-1] // 2  # rotate-half tables repeat their first half: the ops take it once
        if cos.shape[-1] > head_dim or cos.shape[-1] % 2 or not torch.equal(cos[..., :half], cos[..., half:]):
            raise QloraError(f"rotary embedding of {cfg.model_type}: only rotate-half rotary is supported")
        if not long_rope_from:
            g.init(f"{table}.cos", cos[0, :, :half].float().numpy())  # (P, rotary_dim/2)
            g.init(f"{table}.sin", sin[0, :, :half].float().numpy())
            continue
        for name, long, short_part in (("cos", cos, short[0]), ("sin", sin, short[1])):
            g.init(f"{table}.long.{name}", long[0, :, :half].float().numpy())
            g.init(f"{table}.short.{name}", torch.cat([short_part[0, :, :half], long[0, long_rope_from:, :half]]
                                                      ).float().numpy())


HEADS = ("auto", "fp32", "int8", "int4")


def head_format(head: str, approximate: bool, trained: bool = False) -> str:
    """What --head means for this export: `auto` is the trained head's own 4-bit bytes where it was trained
    quantized (--quant-head) and this export's weights can hold them ("trained"), else int4 where the int4
    export is approximate anyway (requantized, or int8-compute int4), else fp32 (see HeadWriter)."""
    if head not in HEADS:
        raise QloraError(f"--head: expected one of {', '.join(HEADS)}, got {head!r}")
    if head != "auto":
        return head
    return "trained" if trained else "int4" if approximate else "fp32"


def trained_head(model: torch.nn.Module, weights: str) -> bool:
    """Whether the model's head was trained quantized (--quant-head) in a form this export stores exactly:
    int4 bytes as MatMulNBits (--weights int4), NF4/FP4 bytes as MatMulBnb4 (--weights nf4)."""
    w = model.get_output_embeddings().weight
    fmt = formats.format_of(w)
    return weights == "int4" and fmt.nbits(w) is not None or weights == "nf4" and fmt.bnb4(w) is not None


class HeadWriter:
    """The output head. Tied heads reuse the embedding (transposed once, at session load) in fp32, or the
    head is MatMulNBits with int8 activations (accuracy_level 4), 8-bit (4x fewer bytes read per token
    than fp32; the head is SmolLM2-135M's largest matrix) or 4-bit (8x, GPTQ-rounded when calibration
    gave its H). An 8-bit head is offered with int8 activations only: onnxruntime's 8-bit kernel with fp32
    activations is slower than the fp32 head. `auto` takes int4 where the export is approximate anyway
    (requantized or int8-compute int4), where it costs no held-out accuracy. A head trained quantized
    (--quant-head) is, under `auto`, its own bytes: MatMulNBits computed as it was trained or as
    --int4-compute says (accuracy_level 0 for fp32 activations, 4 for int8), or MatMulBnb4, so the export
    stays exact and reads a 4-bit head. (The figures: docs/benchmarks.md, "Measurements behind the code".)"""

    def __init__(self, g: Graph, model: torch.nn.Module, weights: str, head: str = "auto",
                 approximate: bool = False, H: Callable[[], torch.Tensor | None] | None = None,
                 int4_compute: str | None = None) -> None:
        """H: gives the head's GPTQ statistics when the graph reaches the head (calibration runs a layer
        at a time, and the head comes last); rounded to nearest without. int4_compute: as LinearWriter's."""
        layer = model.get_output_embeddings()
        self.g, self.weights, self.trained, self.int4_compute = g, weights, None, int4_compute
        self.N, self.K = layer.out_features, layer.in_features
        w = layer.weight
        self.bias = None if layer.bias is None else layer.bias.detach().float().numpy()
        self.tied = w is model.get_input_embeddings().weight
        self._layer = layer
        self.int8_dynamic = weights == "int8" and head in ("auto", "dynamic")  # as the int8 export's Linears
        if head == "dynamic":
            head = "fp32"
        if head != "trained":  # "trained" is what head_format resolved `auto` to for the caller already
            head = head_format(head, approximate, trained_head(model, weights))
        self.quantized, self.bits, self.report = None, 0, "fp16" if weights == "fp16" and not self.tied else "fp32"
        if head == "trained":
            fmt = formats.format_of(w)
            self.trained = fmt.nbits(w) if weights == "int4" else fmt.bnb4(w)
            self.report = f"{fmt.describe(w)} (as trained, --quant-head)"
        elif head in ("int8", "int4"):  # rounded when the graph reaches the head (see _round)
            self.bits, self.report, self._H = {"int8": 8, "int4": 4}[head], head, H

    def float_weight(self) -> torch.Tensor:
        """The head as trained, (N, K) fp32: made only where the export stores it from floats (a quantized
        head dequantized: 1 GB at the Llama-3.2-1B shape, so never for its own bytes)."""
        w = self._layer.weight
        return formats.dequantize(w) if formats.is_quantized(w) else w.detach().float()

    def __call__(self, x: str) -> str:
        y = self._product(x)
        return y if self.bias is None else self.g.op("Add", [y, self.g.init("lm_head.bias", self.bias)])

    def _round(self) -> None:
        if self.bits == 8:
            self.quantized, lossless, err = int4.int8_head(self.float_weight())
            self.report = f"int8 (weights {'lossless' if lossless else f'{100 * err:.3f}% relative error'}; " \
                          "int8 activations)"
        else:
            H = self._H() if self._H else None
            self.quantized, _, err = int4.requantize(self.float_weight(), 32, H)
            self.report = f"int4 ({'gptq' if H is not None else 'rtn'}, weights {100 * err:.2f}% relative error; " \
                          "int8 activations)"

    def _product(self, x: str) -> str:
        g, N, K = self.g, self.N, self.K
        if self.bits and self.quantized is None:
            self._round()
        if self.trained is not None and self.weights == "int4":
            packed, s = self.trained
            return nbits_product(g, "lm_head", x, int4.nbits_inputs(packed, s), s, accuracy_level(s, self.int4_compute),
                                 {}, rows=False)
        if self.trained is not None:  # NF4/FP4 bytes
            packed, absmax, quant_type, block = self.trained
            return g.op("MatMulBnb4", [x, g.init("lm_head.qweight", packed.numpy()),
                                       g.init("lm_head.absmax", absmax.numpy())],
                        domain=MS, K=K, N=N, block_size=block, quant_type=quant_type)
        if self.quantized is not None:
            return matmul_nbits(g, "lm_head", x, self.quantized, K, self.bits, 32, 4, weight=f"q{self.bits}")
        if self.int8_dynamic:  # as the Linears: per-column int8, dynamic uint8 activations
            inputs, _, err = int4.int8_head(self.float_weight(), K)
            self.report = f"int8 (per column, weights {100 * err:.3f}% relative error; int8 activations per row)"
            return int8_product(g, "lm_head", x, inputs)
        if self.tied:
            w = g.op("Transpose", ["model.embed_tokens.weight"], perm=[1, 0])
        else:
            wt = self.float_weight().T.contiguous().numpy()
            w = g.init("lm_head.weight", wt) if self.weights != "fp16" else g.op(
                "Cast", [g.init("lm_head.weight_fp16", wt.astype(np.float16))], to=1)
        return g.op("MatMul", [x, w])
