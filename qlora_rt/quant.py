"""The frozen base's 4-bit weight format: quantize, multiply, dequantize.

This is the one place that knows how a base weight is stored. Everything else (the LoRA layer, merge,
export) goes through the three functions below, so a new format (the project's own int4 layout) is a
new branch here and nowhere else.

Formats:
  nf4 / fp4  bitsandbytes 4-bit, block-wise absmax (blocksize 64 by default); with double quantization
             the absmax values are themselves 8-bit quantized (bitsandbytes' `compress_statistics`).
  none       the weight stays a plain floating-point tensor (useful for plain LoRA and for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora_rt.errors import QloraError

from qlora_rt.config import QUANT_FORMATS as FORMATS


@dataclass(frozen=True)
class QuantConfig:
    format: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise QloraError(f"--quant: unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.format in ("nf4", "fp4") and self.block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise QloraError(f"--block-size: {self.block_size} is not a bitsandbytes block size (64..4096, powers of 2)")

    def as_metadata(self) -> dict[str, str]:
        """String-only description, stored with adapters so merge/export rebuild the very same base."""
        return {"quant.format": self.format, "quant.double_quant": str(self.double_quant).lower(),
                "quant.block_size": str(self.block_size)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], compute_dtype: torch.dtype = torch.float32) -> "QuantConfig | None":
        if "quant.format" not in meta:
            return None
        return cls(format=meta["quant.format"], double_quant=meta.get("quant.double_quant", "true") == "true",
                   block_size=int(meta.get("quant.block_size", "64")), compute_dtype=compute_dtype)


def _bnb():
    import bitsandbytes as bnb  # imported on first use: it probes the GPU and logs on import

    return bnb


def is_quantized(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None


def quantize(weight: torch.Tensor, cfg: QuantConfig, device: torch.device) -> torch.nn.Parameter:
    """Quantize an (out, in) weight to the configured format, frozen, on `device`.

    Deterministic: the same fp32 weight always gives the same bytes, which is what lets merge and export
    rebuild the trained base from the original checkpoint instead of storing a copy of it.
    """
    if cfg.format == "none":
        return torch.nn.Parameter(weight.detach().to(device=device, dtype=cfg.compute_dtype), requires_grad=False)
    bnb = _bnb()
    w = weight.detach().to(device=device, dtype=torch.float32).contiguous()
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=cfg.block_size, compress_statistics=cfg.double_quant, quant_type=cfg.format,
        quant_storage=torch.uint8)
    state.dtype = cfg.compute_dtype  # dtype the matmul dequantizes to
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=cfg.block_size,
                             compress_statistics=cfg.double_quant, quant_type=cfg.format, bnb_quantized=True,
                             module=None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + b for a weight in any format; gradients flow to x only (the base is frozen)."""
    if is_quantized(weight):
        return _bnb().matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)
    return F.linear(x, weight, bias)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the forward pass sees it, in fp32, shape (out, in). Double-quant absmax is folded."""
    if is_quantized(weight):
        bnb = _bnb()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes the weight occupies, quantization statistics included."""
    n = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        n += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            n += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return n


def bnb4_export(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The trained 4-bit bytes as onnxruntime's MatMulBnb4 takes them.

    Returns (packed uint8 (N*K/2,), fp32 absmax (blocks,), quant_type (0 fp4, 1 nf4), block size).
    Double-quantized absmax is folded to fp32 here, exactly as bitsandbytes' own dequantization does.
    """
    if not is_quantized(weight):
        raise QloraError("--weights nf4 needs a base trained in nf4 or fp4 (this one is not 4-bit)")
    bnbf = _bnb().functional
    state = weight.quant_state
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    return (weight.data.reshape(-1).cpu(), absmax.float().cpu(), {"fp4": 0, "nf4": 1}[state.quant_type],
            state.blocksize)
