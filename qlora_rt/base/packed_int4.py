"""The project's int4 format: stored as onnxruntime's MatMulNBits stores it, computed as it computes.

    packed  uint8 (N, k_blocks, block/2)   bits=4: two 4-bit codes a byte, the even index in the low nibble
            uint8 (N, k_blocks, block)     bits=8: a code a byte (a GGUF's 5-, 6- and 8-bit tensors)
    scales  fp32  (N, k_blocks)
    zeros   uint8 (N, k_blocks) codes       asymmetric: w = (q - zero) * scale
            None                            symmetric:  w = (q - mid) * scale, mid = 2**(bits-1)
                                            (8: GGUF Q4_0; 128: Q8_0 with its int8 codes moved up by 128)
    mins    fp32  (N, k_blocks)             GGUF Q4_1, Q5_1, Q4_K, Q5_K:  w = q * scale + min

A float minimum is no integer zero point, so such a weight runs as MatMulNBits on (q - zero)·scale (zero: the
zero points, 0 for the 8-bit types, else the mid) plus a per-block correction c = zero·scale + min applied to
the block sums of x: exact, and still the fast kernel (float zero
points take onnxruntime's CPU kernel off its fast path). How each GGUF type becomes this state, bit for bit:
qlora_rt/base/gguf_reader.py.

compute="fp32" (the default) matches accuracy_level 0: the export equals PyTorch to ~3e-4 in SmolLM2's
logits. compute="int8" reproduces MatMulNBits with accuracy_level 4, the faster CPU path: x is quantized to int8
per block of `block` values (scale = max|x|/127, q = round-half-even(x · (1/scale))) before the product. Measured
against onnxruntime 1.32 on AVX2: max relative difference 4.5e-7, i.e. float rounding only, versus an
error of the order of 1 when the fp32 product is compared with it. Gradients pass straight through the
activation rounding (STE). But a whole W4A8 model is chaotic: on SmolLM2, 1e-7 relative noise on the
embeddings moves the logits by up to 2 (mean 0.28) in PyTorch alone, so no two implementations agree
to 1e-3 whatever they emulate, and the export's int8 parity is reported rather than enforced.

The product never keeps a dequantized weight: forward and backward each rebuild it from the bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

COMPUTE = ("int8", "fp32")
CHUNK = 1 << 22  # weights rounded or dequantized at a time (16 MB in fp32): a large weight goes a slice of rows


@dataclass
class Int4:
    scales: torch.Tensor
    zeros: torch.Tensor | None
    mins: torch.Tensor | None
    K: int
    block: int
    compute: str = "fp32"
    source: str = "rtn"  # rtn | gguf-<type> (as stored in the file) | gguf-<type>-rounded
    bits: int = 4

    @property
    def mid(self) -> int:
        """The symmetric zero point: MatMulNBits' default where a weight has no zero points."""
        return 1 << (self.bits - 1)

    @property
    def correction(self) -> torch.Tensor | None:
        """(N, k_blocks) per-block offsets of a weight with float minimums over its integer part (q - zero)·scale:
        zero·scale + min (zero: the mid where there are no zero points)."""
        if self.mins is None:
            return None
        return self.mins + (self.mid * self.scales if self.zeros is None else self.zeros.float() * self.scales)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(..., m) bytes -> (..., 2m) uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2m) uint8 codes < 16 -> (..., m) bytes, even index in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) -> (N, k_blocks, block), zero-padded along K."""
    N, K = w.shape
    kb = -(-K // block)
    return torch.nn.functional.pad(w.float(), (0, kb * block - K)).view(N, kb, block)


def quantize(w: torch.Tensor, block: int = 32, symmetric: bool = False, compute: str = "fp32"
             ) -> tuple[torch.Tensor, Int4]:
    """Round-to-nearest: (N, K) float -> (packed, Int4). Asymmetric keeps 0 in range so padding is exact.
    Rows are independent: a large weight is rounded CHUNK values at a time (its fp32 temporaries bounded)."""
    step = _rows_per_slice(w.shape[1])
    if w.shape[0] <= step:
        return _quantize(w, block, symmetric, compute)
    parts = [_quantize(w[r0:r0 + step], block, symmetric, compute) for r0 in range(0, w.shape[0], step)]
    s = parts[0][1]
    return torch.cat([p for p, _ in parts]), replace(s, scales=torch.cat([q.scales for _, q in parts]),
                                                    zeros=None if symmetric else torch.cat([q.zeros for _, q in parts]))


def _quantize(w: torch.Tensor, block: int, symmetric: bool, compute: str) -> tuple[torch.Tensor, Int4]:
    blocks = _blocks(w.detach(), block)  # (N, kb, block)
    if symmetric:  # as GGUF Q4_0: the largest-magnitude value maps to code 0 exactly
        idx = blocks.abs().argmax(-1, keepdim=True)
        scale = (torch.gather(blocks, -1, idx) / -8).squeeze(-1)  # (N, kb)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(blocks / safe[..., None]) + 8, 0, 15).to(torch.uint8)
        return pack(codes), Int4(scale, None, None, w.shape[1], block, compute)
    scale, zeros = _asymmetric_grid(blocks)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(blocks / safe[..., None]) + zeros[..., None], 0, 15).to(torch.uint8)
    return pack(codes), Int4(scale, zeros.to(torch.uint8), None, w.shape[1], block, compute)


def _asymmetric_grid(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., block) values -> per-block scale and integer zero point (float) spanning [min, max] ∋ 0."""
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / safe).clamp(0, 15)


def gptq(w: torch.Tensor, H: torch.Tensor, block: int = 32, damp: float = 0.01, batch: int = 128
         ) -> tuple[torch.Tensor, Int4]:
    """Asymmetric int4 with GPTQ's error feedback (Frantar et al., 2022) instead of round-to-nearest.

    Columns are rounded one at a time, left to right; each one's rounding error is spread over the
    columns not yet rounded, weighted by the inverse of H = Σ xᵀx over calibration inputs, so the
    layer's *outputs* on such inputs stay close: ‖X(W − Ŵ)‖ rather than ‖W − Ŵ‖. A block's scale and
    zero point come from its columns as updated when the block is reached. Same layout as `quantize`.
    """
    W = w.detach().float().clone()  # (N, K)
    N, K = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs never seen: nothing to preserve, round them plainly
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(K)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU
    kb = -(-K // block)
    batch = max(batch // block, 1) * block  # a block's columns always lie in one batch
    codes = torch.zeros(N, kb * block, dtype=torch.uint8)
    scales, zeros = torch.zeros(N, kb), torch.zeros(N, kb)
    for i1 in range(0, K, batch):  # lazy batches: the rest of W is updated once per batch
        i2 = min(i1 + batch, K)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                b = col // block
                scales[:, b], zeros[:, b] = _asymmetric_grid(W1[:, i:i + block])
                safe = torch.where(scales[:, b] == 0, torch.ones(N), scales[:, b])
            q = torch.clamp(torch.round(W1[:, i] / safe) + zeros[:, b], 0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - zeros[:, b]) * scales[:, b]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes[:, K:] = zeros[:, -1:].to(torch.uint8)  # padding decodes to 0, as in `quantize`
    packed = pack(codes.view(N, kb, block))
    return packed, Int4(scales, zeros.to(torch.uint8), None, K, block)


def dequantize(packed: torch.Tensor, s: Int4, symmetric_part: bool = False, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The (N, K) weight, computed in fp32 and stored in `dtype` (a bf16 result is the fp32 weight rounded once).
    symmetric_part: for a weight with float minimums, only (q - zero)·scale (what MatMulNBits holds).

    The codes are unpacked in 16-bit lanes (a byte's two nibbles become one int16's two bytes, in order on a
    little-endian machine), q - zero is taken in int8 (exact), then one product casts: bit for bit
    `((q.float() - zero) * scale)` in fewer and cheaper passes over the weight than float arithmetic on the
    codes."""
    N, kb, width = packed.shape
    q = packed if s.bits == 8 else _codes(packed).view(N, kb, 2 * width)
    if s.mins is not None and not symmetric_part:
        # gguf's own formula, bit for bit (not addcmul: a fused multiply-add rounds once, differently)
        out = torch.mul(q, s.scales[..., None]).add_(s.mins[..., None]).to(dtype)
    else:
        out = torch.empty(q.shape, dtype=dtype, device=packed.device)
        # q - zero exactly: 4-bit codes in int8, 8-bit ones in int16
        lanes = torch.int8 if s.bits == 4 else torch.int16
        zero = s.mid if s.zeros is None else s.zeros.to(lanes)[..., None]
        centred = torch.sub(q.view(torch.int8) if s.bits == 4 else q.to(lanes), zero)
        torch.mul(centred, s.scales[..., None], out=out)
    return out.flatten(1)[:, : s.K]


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """(..., m) bytes -> (..., 2m) uint8 codes, as `unpack`: on a little-endian machine through int16 lanes, the
    low nibble in the low byte (contiguous passes only; writing each nibble to every other byte is slower)."""
    if sys.byteorder != "little":
        return unpack(packed)
    w = packed.to(torch.int16)
    return ((w & 0xF) | ((w >> 4) << 8)).view(torch.uint8)


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as MatMulNBits' int8 path sees it: per block of K, scale = max|x|/127, q = round(x · (1/scale)).

    The order of the float operations matters: x·(127/max|x|) rounds differently often enough to be
    seen (224 of 1M outputs off by up to 0.09 in a test), x·(1/scale) matches onnxruntime exactly.
    """
    K = x.shape[-1]
    pad = (-K) % block
    xb = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, block))  # (..., kb, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(xb * inv) * scale).flatten(-2)[..., :K]


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., K) -> (..., k_blocks): the sums the Q4_1 correction multiplies."""
    pad = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, block)).sum(-1)


def _rows_per_slice(K: int) -> int:
    return max(1, CHUNK // K)


def _row_slices(s: Int4, N: int):
    """(r0, r1, the state of rows r0:r1) covering N rows, each slice at most CHUNK weights."""
    step = _rows_per_slice(s.K)
    for r0 in range(0, N, step):
        r1 = min(r0 + step, N)
        yield r0, r1, replace(s, scales=s.scales[r0:r1], zeros=None if s.zeros is None else s.zeros[r0:r1],
                              mins=None if s.mins is None else s.mins[r0:r1])


def relative_error(packed: torch.Tensor, s: Int4, w: torch.Tensor) -> float:
    """‖dequantize(packed) - w‖ / ‖w‖, a slice of rows at a time (no full-size fp32 copy of a large weight)."""
    err = ref = 0.0
    for r0, r1, part in _row_slices(s, packed.shape[0]):
        rows = w[r0:r1].detach().float()
        err += float((dequantize(packed[r0:r1], part) - rows).square().sum())
        ref += float(rows.square().sum())
    return (err / max(ref, 1e-24)) ** 0.5


class _Linear(torch.autograd.Function):
    """x @ W.T with W rebuilt from its bytes a slice of rows at a time, forward and backward: the transient weight
    is at most CHUNK values (an output head of 49152 x 576, or a 14336 x 4096 MLP weight, would otherwise be
    dequantized whole, 113-235 MB and a few temporaries each, in every step).

    dtype: the product's (x's own by default). bf16 (a training choice, `qlora_rt.lora.layers.fast_products`)
    multiplies the fp32 weight rounded to bf16 by x rounded to bf16 and returns x's dtype: what the CPU's bf16
    matrix units (AMX, AVX512-BF16) take."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, s: Int4, dtype: torch.dtype) -> torch.Tensor:
        ctx.packed, ctx.s, ctx.dtype = packed, s, dtype  # the frozen bytes only; backward rebuilds the weight
        xq = (quantize_activations(x, s.block) if s.compute == "int8" else x).to(dtype)
        sums = block_sums(x, s.block) if s.mins is not None else None
        slices = list(_row_slices(s, packed.shape[0]))
        y = x.new_empty(*x.shape[:-1], packed.shape[0]) if len(slices) > 1 else None
        for r0, r1, part in slices:
            out = (xq @ dequantize(packed[r0:r1], part, symmetric_part=True, dtype=dtype).T).to(x.dtype)
            if sums is not None:
                out += sums @ part.correction.to(x.dtype).T
            if y is None:
                return out
            y[..., r0:r1] = out
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # straight-through the activation rounding: d/dx of x @ W.T with W the full dequantized weight
        gx = None
        g16 = grad.to(ctx.dtype)
        for r0, r1, part in _row_slices(ctx.s, ctx.packed.shape[0]):
            g = (g16[..., r0:r1] @ dequantize(ctx.packed[r0:r1], part, dtype=ctx.dtype)).to(grad.dtype)
            gx = g if gx is None else gx.add_(g)
        return gx, None, None, None


def linear(x: torch.Tensor, packed: torch.Tensor, s: Int4, bias: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    y = _Linear.apply(x, packed, s, dtype or x.dtype)
    return y if bias is None else y + bias
