"""The frozen base's 4-bit weight format: quantize, multiply, dequantize.

This is the one place that knows how a base weight is stored: each format is one object (`Format`) that
quantizes, multiplies, dequantizes, saves and describes its weights, and `format_of(weight)` is the one
place that tells a stored weight's format. Everything else (the LoRA layer, merge, PiSSA/LoftQ, export)
asks that object and never branches on a format's name; a new format is a new class here.

Formats:
  nf4 / fp4  bitsandbytes 4-bit, block-wise absmax (blocksize 64 by default); with double quantization
             the absmax values are themselves 8-bit quantized (bitsandbytes' `compress_statistics`).
  int4       the project's own format (qlora_rt/base/packed_int4.py): laid out and computed as onnxruntime's
             MatMulNBits, so the adapter-aware int4 export is the trained model, byte for byte. From a GGUF
             (`gguf="file"`), every tensor keeps its stored type: 4-bit types (Q4_0, Q4_1, Q4_K) at bits=4,
             5-, 6- and 8-bit ones (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) at bits=8, the head too; so "int4" names the
             MatMulNBits family, and each weight's own state says its bits, block and GGUF type.
  none       the weight stays a plain floating-point tensor (useful for plain LoRA and for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qlora_rt.base import packed_int4 as int4
from qlora_rt.config import QUANT_FORMATS
from qlora_rt.errors import QloraError

DEFAULT_BLOCK = {"nf4": 64, "fp4": 64, "int4": 32, "none": 64}
# a GGUF base under int4: file = every tensor in its stored type (exact); int4 = 4 bits with integer zero points
# (Q4_0 as stored, every other type rounded once); q4 = Q4_0/Q4_1 as stored and the rest rounded (what adapters
# trained before `gguf` existed were trained on, `--gguf-q4-1 exact`; read from their files, not a choice)
GGUF_MODES = ("file", "int4", "q4")


@dataclass(frozen=True)
class QuantConfig:
    format: str = "nf4"
    double_quant: bool = True
    block_size: int | None = None  # None: the format's default (DEFAULT_BLOCK)
    compute_dtype: torch.dtype = torch.float32
    symmetric: bool = False  # int4: zero point 8 (as GGUF Q4_0) instead of one per block
    int4_compute: str = "fp32"  # int4: as MatMulNBits accuracy_level 0 (fp32) or 4 (int8 activations)
    head: bool = False  # the output head is quantized (frozen) too, in the same format: see lora.quantize_head
    gguf: str = "file"  # int4 from a GGUF: GGUF_MODES

    def __post_init__(self) -> None:
        if self.format not in QUANT_FORMATS:
            raise QloraError(f"--quant: unknown format {self.format!r}; expected one of {', '.join(QUANT_FORMATS)}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK[self.format])
        if self.format in ("nf4", "fp4") and self.block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise QloraError(f"--block-size: {self.block_size} is not a bitsandbytes block size "
                             "(64..4096, powers of 2)")
        if self.format == "int4" and self.block_size not in (16, 32, 64, 128, 256):
            raise QloraError(f"--block-size: {self.block_size} is not a MatMulNBits block size (16, 32, 64, 128, 256)")
        if self.int4_compute not in int4.COMPUTE:
            raise QloraError(f"--int4-compute: expected one of {', '.join(int4.COMPUTE)}, got {self.int4_compute!r}")
        if self.gguf not in GGUF_MODES:
            raise QloraError(f"--gguf: expected one of file, int4, got {self.gguf!r}")
        if self.gguf == "int4" and self.format != "int4":
            raise QloraError(f"--gguf int4: only with --quant int4 (a GGUF's weights become the int4 base); "
                             f"--quant {self.format} quantizes the GGUF's dequantized weights")
        if self.head and self.format == "none":
            raise QloraError("--quant-head: the base is not quantized (--quant none); nothing to do")

    @property
    def base_name(self) -> str:
        """The trained base's format as exports record it (`base_quant`): an adapter fits only its own."""
        return self.format + ("+head" if self.head else "")

    def as_metadata(self) -> dict[str, str]:
        """String-only description, stored with adapters so merge/export rebuild the very same base."""
        meta = {"quant.format": self.format, "quant.double_quant": str(self.double_quant).lower(),
                "quant.block_size": str(self.block_size)}
        if self.format == "int4":
            meta.update({"quant.symmetric": str(self.symmetric).lower(), "quant.int4_compute": self.int4_compute,
                         "quant.gguf": self.gguf})
        if self.head:
            meta["quant.head"] = "true"
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], compute_dtype: torch.dtype = torch.float32) -> QuantConfig | None:
        if "quant.format" not in meta:
            return None
        return cls(format=meta["quant.format"], double_quant=meta.get("quant.double_quant", "true") == "true",
                   block_size=int(meta.get("quant.block_size", "64")), compute_dtype=compute_dtype,
                   symmetric=meta.get("quant.symmetric", "false") == "true",
                   int4_compute=meta.get("quant.int4_compute", "fp32"), head=meta.get("quant.head") == "true",
                   gguf=meta.get("quant.gguf") or ("file" if meta["quant.format"] != "int4" else
                                                   {"round": "int4"}.get(meta.get("quant.gguf_q4_1", ""), "q4")))


def _bnb():
    import bitsandbytes as bnb  # imported on first use: it probes the GPU and logs on import

    return bnb


class NBitsBytes(NamedTuple):
    """A weight as com.microsoft.MatMulNBits takes it: the packed bytes and their int4 state."""
    packed: torch.Tensor
    state: int4.Int4


class Bnb4Bytes(NamedTuple):
    """A weight as com.microsoft.MatMulBnb4 takes it."""
    packed: torch.Tensor   # uint8, two 4-bit codes a byte
    absmax: torch.Tensor   # fp32, one per block
    quant_type: int        # 0 fp4, 1 nf4
    block: int


class Format:
    """A frozen base weight's storage: a Parameter the format made (`quantize`), read only through it."""

    name = "?"

    def quantize(self, weight: torch.Tensor, cfg: QuantConfig, device: torch.device,
                 imported: tuple[torch.Tensor, int4.Int4] | None = None) -> torch.nn.Parameter:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """x @ W.T + b, the product in `dtype` where given (x's own otherwise), the result in x's dtype."""
        raise NotImplementedError

    def dequantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the forward pass sees it, in fp32, shape (out, in)."""
        raise NotImplementedError

    def storage_bytes(self, weight: torch.Tensor) -> int:
        return weight.numel() * weight.element_size()

    def state_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_state_tensors(self, t: dict[str, torch.Tensor], cfg: QuantConfig,
                           device: torch.device) -> torch.nn.Parameter:
        raise NotImplementedError

    def describe(self, weight: torch.Tensor) -> str:
        return self.name

    def import_gguf(self, path, config, cfg: QuantConfig) -> dict[str, tuple[torch.Tensor, int4.Int4]]:
        """Linear weights a GGUF file holds in this very format, by module name, to take as they are (the rest
        are quantized from their dequantized values)."""
        return {}

    # What the exporter may ask: the weight's exact form for an onnxruntime 4-bit kernel, where it has one.
    def nbits(self, weight: torch.Tensor) -> NBitsBytes | None:
        """The stored bytes and state as com.microsoft.MatMulNBits takes them (exact), or None."""
        return None

    def bnb4(self, weight: torch.Tensor) -> Bnb4Bytes | None:
        """The stored bytes as com.microsoft.MatMulBnb4 takes them (exact), or None."""
        return None

    def approximate_in_onnx(self, weight: torch.Tensor) -> bool:
        """Whether its onnxruntime product is not held to the fp32 tolerance (int8 activations)."""
        return False


class Plain(Format):
    """`--quant none`: a plain floating-point tensor in the compute dtype (plain LoRA, tests)."""

    name = "none"

    def quantize(self, weight, cfg, device, imported=None):
        return torch.nn.Parameter(weight.detach().to(device=device, dtype=cfg.compute_dtype), requires_grad=False)

    def linear(self, x, weight, bias, dtype=None):
        if dtype is None or dtype == x.dtype:
            return F.linear(x, weight, bias)
        y = F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)
        return y if bias is None else y + bias

    def dequantize(self, weight):
        return weight.detach().float()

    def state_tensors(self, weight):
        return {"weight": weight.detach().float()}

    def from_state_tensors(self, t, cfg, device):
        return torch.nn.Parameter(t["weight"].to(device=device, dtype=cfg.compute_dtype), requires_grad=False)

    def describe(self, weight):
        return str(weight.dtype).removeprefix("torch.")


class Bnb4(Format):
    """bitsandbytes NF4 / FP4: block-wise absmax, optionally double-quantized; `Params4bit` weights."""

    def __init__(self, name: str) -> None:
        self.name = name

    def quantize(self, weight, cfg, device, imported=None):
        bnb = _bnb()
        w = weight.detach().to(device=device, dtype=torch.float32).contiguous()
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=cfg.block_size, compress_statistics=cfg.double_quant, quant_type=self.name,
            quant_storage=torch.uint8)
        state.dtype = cfg.compute_dtype  # dtype the matmul dequantizes to
        return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=cfg.block_size,
                                 compress_statistics=cfg.double_quant, quant_type=self.name, bnb_quantized=True,
                                 module=None)

    def linear(self, x, weight, bias, dtype=None):
        if dtype is None or dtype == x.dtype:
            return _bnb().matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)
        # bitsandbytes dequantizes to its input's dtype: a bf16 x makes it a bf16 product
        y = _bnb().matmul_4bit(x.to(dtype), weight.t(), quant_state=weight.quant_state).to(x.dtype)
        return y if bias is None else y + bias

    def dequantize(self, weight):
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).float()  # double quant folded

    def storage_bytes(self, weight):
        state = weight.quant_state
        n = weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            n += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return n

    def state_tensors(self, weight):
        return {"weight": weight.data, **{f"qs.{k}": v for k, v in weight.quant_state.as_dict(packed=True).items()}}

    def from_state_tensors(self, t, cfg, device):
        bnbf = _bnb().functional
        state = bnbf.QuantState.from_dict({k[3:]: v for k, v in t.items() if k.startswith("qs.")}, device=device)
        state.dtype = cfg.compute_dtype
        return _bnb().nn.Params4bit(t["weight"].to(device), requires_grad=False, quant_state=state,
                                    blocksize=state.blocksize, compress_statistics=state.nested,
                                    quant_type=state.quant_type, bnb_quantized=True, module=None)

    def describe(self, weight):
        return weight.quant_state.quant_type

    def bnb4(self, weight):
        """Double-quantized absmax is folded to fp32 here, exactly as bitsandbytes' own dequantization does."""
        bnbf = _bnb().functional
        state = weight.quant_state
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        return Bnb4Bytes(weight.data.reshape(-1).cpu(), absmax.float().cpu(), {"fp4": 0, "nf4": 1}[state.quant_type],
                         state.blocksize)


class Int4Format(Format):
    """The project's own int4 (qlora_rt/base/packed_int4.py): packed bytes with an `Int4` state, laid out and
    computed as onnxruntime's MatMulNBits; a GGUF base's Q4_0/Q4_1 tensors are imported as they are."""

    name = "int4"

    def quantize(self, weight, cfg, device, imported=None):
        packed, state = imported or int4.quantize(weight, cfg.block_size, cfg.symmetric, cfg.int4_compute)
        return self._param(packed, state, device)

    @staticmethod
    def _param(packed: torch.Tensor, state: int4.Int4, device: torch.device) -> torch.nn.Parameter:
        state.scales = state.scales.to(device)
        state.zeros = None if state.zeros is None else state.zeros.to(device)
        state.mins = None if state.mins is None else state.mins.to(device)
        param = torch.nn.Parameter(packed.to(device), requires_grad=False)
        param.int4 = state
        return param

    def linear(self, x, weight, bias, dtype=None):
        return int4.linear(x, weight, weight.int4, bias, dtype)

    def dequantize(self, weight):
        return int4.dequantize(weight.data, weight.int4)

    def storage_bytes(self, weight):
        s = weight.int4
        return weight.numel() * weight.element_size() + sum(
            t.numel() * t.element_size() for t in (s.scales, s.zeros, s.mins) if t is not None)

    def state_tensors(self, weight):
        s = weight.int4
        out = {"weight": weight.data, "scales": s.scales, "K": torch.tensor([s.K, s.block, s.bits])}
        out.update({k: v for k, v in (("zeros", s.zeros), ("mins", s.mins)) if v is not None})
        return out

    def from_state_tensors(self, t, cfg, device):
        K, block, *bits = (int(v) for v in t["K"])
        state = int4.Int4(t["scales"], t.get("zeros"), t.get("mins"), K, block, cfg.int4_compute, "rtn", *bits)
        return self._param(t["weight"], state, device)

    def import_gguf(self, path, config, cfg):
        """gguf="file": every block-type Linear, and the head under --quant-head (as "lm_head"), as stored;
        "int4"/"q4": the Q4_0/Q4_1 Linears (Q4_1 rounded once under "int4"), the rest rounded from their weights."""
        import warnings

        from qlora_rt.base import gguf_reader

        if cfg.gguf == "file":
            imported, other = gguf_reader.stored_linears(path, config, compute=cfg.int4_compute, head=cfg.head)
            if other:
                warnings.warn(f"{len(other)} weights of {path.name} are stored as floats or in a type not read as "
                              f"stored (e.g. {other[0]}): they are quantized to int4 by rounding")
            return imported
        if cfg.block_size != 32:
            warnings.warn(f"--block-size {cfg.block_size}: GGUF Q4 blocks hold 32 weights, so the base is requantized "
                          "from its dequantized weights; use --block-size 32 to train on the file's own int4 weights")
            return {}
        imported, other = gguf_reader.stored_linears(path, config, kinds=("Q4_0", "Q4_1"), compute=cfg.int4_compute)
        if other:
            warnings.warn(f"{len(other)} Linear weights of {path.name} are not Q4_0/Q4_1 (e.g. {other[0]}): they are "
                          "dequantized and requantized to int4 by rounding (--gguf file keeps every type as stored)")
        if cfg.gguf == "int4":
            imported = _round_q4_1(imported, cfg)
        return imported

    def describe(self, weight):
        s = weight.int4
        return s.source.removeprefix("gguf-").upper() + f" ({s.bits}-bit)" if s.source.startswith("gguf") else "int4"

    def nbits(self, weight):
        return NBitsBytes(weight.data, weight.int4)

    def approximate_in_onnx(self, weight):
        return weight.int4.compute == "int8"


def _round_q4_1(imported: dict[str, tuple[torch.Tensor, int4.Int4]], cfg: QuantConfig
                ) -> dict[str, tuple[torch.Tensor, int4.Int4]]:
    """`--gguf int4`: each Q4_1 weight (a float minimum per block) rounded once to int4 with an integer
    zero point per block, so its export is one plain MatMulNBits. Where a block's codes span 0..15 around
    zero this keeps its codes and scale and moves its minimum to the nearest step (an error of at most half
    a step, the same for the block's 32 weights); deterministic, so merge and export rebuild the same base.
    Prints the mean relative weight error over the rounded Linears."""
    import sys

    errors = []
    for name, (packed, s) in imported.items():
        if s.mins is None:  # Q4_0 already is plain symmetric MatMulNBits
            continue
        w = int4.dequantize(packed, s)
        packed2, s2 = int4.quantize(w, s.block, False, cfg.int4_compute)
        s2.source = "gguf-q4_1-rounded"
        errors.append(float((int4.dequantize(packed2, s2) - w).norm() / w.norm().clamp_min(1e-30)))
        imported[name] = (packed2, s2)
    if errors:
        print(f"--gguf int4: {len(errors)} Q4_1 Linears rounded to int4 with integer zero points, mean relative "
              f"weight error {100 * sum(errors) / len(errors):.2f}% (max {100 * max(errors):.2f}%)", file=sys.stderr)
    return imported


PLAIN = Plain()
FORMATS: dict[str, Format] = {"nf4": Bnb4("nf4"), "fp4": Bnb4("fp4"), "int4": Int4Format(), "none": PLAIN}


def format_of(weight: torch.Tensor) -> Format:
    """The format a stored weight is in: the one place that tells them apart."""
    if getattr(weight, "int4", None) is not None:
        return FORMATS["int4"]
    state = getattr(weight, "quant_state", None)
    return FORMATS[state.quant_type] if state is not None else PLAIN


def is_quantized(weight: torch.Tensor) -> bool:
    return format_of(weight) is not PLAIN


def types_of(model: torch.nn.Module) -> dict[str, int]:
    """How many frozen weights (Linears, a quantized head) a model holds in each type: a GGUF's tensors each in
    their own ("Q4_K (4-bit)", "Q5_0 (8-bit)", ...), or the one format it was quantized to."""
    from collections import Counter

    weights = [getattr(m, "weight", None) for m in model.modules()]
    return dict(sorted(Counter(format_of(w).describe(w) for w in weights
                               if isinstance(w, torch.Tensor) and is_quantized(w)).items()))


def quantize(weight: torch.Tensor, cfg: QuantConfig, device: torch.device,
             imported: tuple[torch.Tensor, int4.Int4] | None = None) -> torch.nn.Parameter:
    """Quantize an (out, in) weight to the configured format, frozen, on `device`.

    Deterministic: the same fp32 weight always gives the same bytes, which is what lets merge and export
    rebuild the trained base from the original checkpoint instead of storing a copy of it.
    `imported`: int4 bytes taken as they are from the source file (GGUF Q4_0/Q4_1) instead of rounding.
    """
    return FORMATS[cfg.format].quantize(weight, cfg, device, imported)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ W.T + b for a weight in any format; gradients flow to x only (the base is frozen).
    dtype: the product's, where it differs from x's (bf16 products in fp32 training); y is in x's dtype."""
    return format_of(weight).linear(x, weight, bias, dtype)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the forward pass sees it, in fp32, shape (out, in). Double-quant absmax is folded."""
    return format_of(weight).dequantize(weight)


def storage_bytes(weight: torch.Tensor) -> int:
    """Bytes the weight occupies, quantization statistics included."""
    return format_of(weight).storage_bytes(weight)


def state_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that rebuild a frozen weight exactly (`from_state_tensors`), for saving a base that
    cannot be regenerated from the checkpoint (a PiSSA/LoftQ residual). Keys are relative: prefix them."""
    return {k: v.detach().cpu().contiguous() for k, v in format_of(weight).state_tensors(weight).items()}


def from_state_tensors(t: dict[str, torch.Tensor], cfg: QuantConfig, device: torch.device) -> torch.nn.Parameter:
    """Inverse of `state_tensors` for a base of format `cfg.format`."""
    return FORMATS[cfg.format].from_state_tensors(t, cfg, device)
