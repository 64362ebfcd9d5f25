"""The project's int4 weights (qlora_rt/int4.py) as the inputs of `com.microsoft.MatMulNBits`.

    B            uint8 (N, k_blocks, block/2)   the stored bytes, as they are
    scales       fp32  (N, k_blocks)
    zero_points  uint8 (N, ceil(k_blocks/2))    two 4-bit zero points a byte, low nibble first;
                                                absent for symmetric weights (the kernel's default is 8)
    correction   fp32  (k_blocks, N)            GGUF Q4_1 only: 8·scale + min, applied to x's block sums
"""

from __future__ import annotations

import numpy as np
import torch

from qlora_rt import int4
from qlora_rt.int4 import Int4


def nbits_inputs(packed: torch.Tensor, s: Int4) -> dict[str, np.ndarray]:
    out = {"qweight": packed.cpu().contiguous().numpy(), "scales": s.scales.float().cpu().contiguous().numpy()}
    if s.zeros is not None:
        z = s.zeros.cpu()
        if z.shape[1] % 2:
            z = torch.cat([z, torch.zeros(z.shape[0], 1, dtype=torch.uint8)], dim=1)
        out["zero_points"] = int4.pack(z).numpy()
    if s.correction is not None:
        out["correction"] = s.correction.float().cpu().T.contiguous().numpy()
    return out


def requantize(w: torch.Tensor, block: int) -> tuple[dict[str, np.ndarray], Int4, float]:
    """A float weight rounded to asymmetric int4: its MatMulNBits inputs, and the relative error it costs."""
    packed, s = int4.quantize(w, block)
    w = w.detach().float()
    err = (int4.dequantize(packed, s) - w).norm() / w.norm().clamp(min=1e-12)
    return nbits_inputs(packed, s), s, float(err)
