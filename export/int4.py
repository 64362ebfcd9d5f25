"""int4 weights in `com.microsoft.MatMulNBits` layout: block-wise asymmetric round-to-nearest.

    B            uint8 (N, k_blocks, block/2)   two codes a byte, the even index in the low nibble
    scales       fp32  (N, k_blocks)
    zero_points  uint8 (N, ceil(k_blocks/2))    two 4-bit zero points a byte, low nibble first
    w ≈ (code - zero_point) * scale, per block of `block` weights along K

`dequantize` gives exactly the weights the kernel multiplies by, so the export can measure the
requantization error instead of hiding it.
"""

from __future__ import annotations

import numpy as np
import torch


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2m) uint8 codes < 16 -> (..., m) bytes, even index in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def quantize(w: torch.Tensor, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float weight -> (B, scales, zero_points) for MatMulNBits(bits=4, block_size=block)."""
    N, K = w.shape
    kb = -(-K // block)
    wp = torch.zeros(N, kb * block, dtype=torch.float32)
    wp[:, :K] = w.detach().float()
    blocks = wp.view(N, kb, block)  # (N, kb, block)
    lo = blocks.amin(-1).clamp(max=0)  # the range always holds 0, so zero padding stays exact
    hi = blocks.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)  # (N, kb)
    zp = torch.round(-lo / scale).clamp(0, 15)
    codes = torch.clamp(torch.round(blocks / scale[..., None]) + zp[..., None], 0, 15).to(torch.uint8)
    zp_u8 = zp.to(torch.uint8)
    if kb % 2:
        zp_u8 = torch.cat([zp_u8, torch.zeros(N, 1, dtype=torch.uint8)], dim=1)
    return (_pack_nibbles(codes).numpy(), scale.numpy().astype(np.float32), _pack_nibbles(zp_u8).numpy())


def dequantize(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, K: int) -> torch.Tensor:
    """The (N, K) fp32 weight MatMulNBits computes with."""
    b = torch.from_numpy(B)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).float()  # (N, kb, block)
    z = torch.from_numpy(zero_points)
    zp = torch.stack([z & 0xF, z >> 4], dim=-1).flatten(-2)[:, : scales.shape[1]].float()  # (N, kb)
    w = (codes - zp[..., None]) * torch.from_numpy(scales)[..., None]
    return w.flatten(1)[:, :K]
