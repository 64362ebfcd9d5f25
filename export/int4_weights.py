"""The project's int4 weights (qlora_rt/base/packed_int4.py) as the inputs of `com.microsoft.MatMulNBits`.

    B            uint8 (N, k_blocks, block/2)   the stored bytes, as they are (bits=8: (N, k_blocks, block))
    scales       fp32  (N, k_blocks)
    zero_points  uint8 (N, ceil(k_blocks/2))    two 4-bit zero points a byte, low nibble first (bits=8: one a
                                                byte, (N, k_blocks)); absent for symmetric weights (the kernel's
                                                default is 2**(bits-1))
    correction   fp32  (k_blocks, N)            float minimums only (GGUF Q4_1, Q5_1, Q4_K, Q5_K):
                                                mid·scale + min, applied to x's block sums
"""

from __future__ import annotations

import numpy as np
import torch

from qlora_rt.base import packed_int4
from qlora_rt.base.packed_int4 import Int4


def nbits_inputs(packed: torch.Tensor, s: Int4) -> dict[str, np.ndarray]:
    out = {"qweight": packed.cpu().contiguous().numpy(), "scales": s.scales.float().cpu().contiguous().numpy()}
    if s.zeros is not None and s.bits == 8:
        out["zero_points"] = s.zeros.cpu().contiguous().numpy()
    elif s.zeros is not None:
        z = s.zeros.cpu()
        if z.shape[1] % 2:
            z = torch.cat([z, torch.zeros(z.shape[0], 1, dtype=torch.uint8)], dim=1)
        out["zero_points"] = packed_int4.pack(z).numpy()
    if s.correction is not None:
        out["correction"] = s.correction.float().cpu().T.contiguous().numpy()
    return out


def _pack4(codes: np.ndarray) -> np.ndarray:
    """(..., 2m) codes < 16 -> (..., m) bytes, the even index in the low nibble (MatMulNBits' bits=4 layout)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def nibble_halves(inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An 8-bit weight's MatMulNBits inputs as two 4-bit ones whose products add up to it exactly:
    (q - z)·d = (q_hi - z_hi)·16d + (q_lo - z_lo)·d, with q = 16·q_hi + q_lo and z = 16·z_hi + z_lo (z: the
    zero points, or 128). onnxruntime's CPU kernel multiplies 4-bit weights by fp32 activations ~10x faster than
    8-bit ones (its 8-bit fp32 path dequantizes the whole weight each call); with int8 activations the 8-bit
    kernel is as fast, and the weight stays one product."""
    q, d = inputs["qweight"], inputs["scales"]
    z = inputs.get("zero_points")
    z = np.full(d.shape, 128, np.uint8) if z is None else z
    halves = []
    for codes, zero, scale in ((q >> 4, z >> 4, 16 * d), (q & 15, z & 15, d)):
        halves.append({"qweight": _pack4(codes), "scales": scale.astype(np.float32), "zero_points": _pack4(zero)})
    return halves[0], halves[1]


def requantize(w: torch.Tensor, block: int, H: torch.Tensor | None = None) -> tuple[dict[str, np.ndarray], Int4, float]:
    """A float weight rounded to asymmetric int4 (GPTQ when the inputs' H is given, else to nearest): its
    MatMulNBits inputs, and the relative weight error it costs."""
    packed, s = packed_int4.quantize(w, block) if H is None else packed_int4.gptq(w, H, block)
    return nbits_inputs(packed, s), s, packed_int4.relative_error(packed, s, w)


def int8_head(w: torch.Tensor, block: int = 32) -> tuple[dict[str, np.ndarray], bool, float]:
    """An (N, K) head as 8-bit symmetric MatMulNBits (code = round(w/scale) + 128, scale = max|w|/127 per
    block): its inputs, whether it is lossless (a GGUF Q8_0 weight comes back exactly), and its error.
    A slice of rows at a time, so a large head has no full-size fp32 temporaries."""
    qweight, scales, lossless, err, ref = [], [], True, 0.0, 0.0
    step = packed_int4._rows_per_slice(w.shape[1])
    for r0 in range(0, w.shape[0], step):
        rows = w[r0:r0 + step].detach().float()
        blocks = packed_int4._blocks(rows, block)  # (n, kb, block)
        scale = blocks.abs().amax(-1) / 127  # (n, kb)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round(blocks / safe[..., None]), -127, 127)
        back = (codes * scale[..., None]).flatten(1)[:, : w.shape[1]]
        lossless = lossless and torch.allclose(back, rows, rtol=1e-6, atol=0)
        err += float((back - rows).square().sum())
        ref += float(rows.square().sum())
        qweight.append((codes + 128).to(torch.uint8))
        scales.append(scale.float())
    return ({"qweight": torch.cat(qweight).numpy(), "scales": torch.cat(scales).numpy()}, lossless,
            (err / max(ref, 1e-24)) ** 0.5)
