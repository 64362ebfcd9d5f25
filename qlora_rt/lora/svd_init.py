"""SVD-based adapter initialisation on a quantized base: PiSSA and LoftQ.

Both split a full-precision weight W (out, in) into a frozen 4-bit base Q and a rank-r update, so the
layer starts as deq(Q) + s·B·A ≈ W instead of deq(quantize(W)) + 0:

  PiSSA  B·A ← the top-r singular triplets of W;  Q = quantize(W − s·B·A)   (the *residual* is frozen)
  LoftQ  start from B·A = 0; repeat `iters` times:
             Q = quantize(W − s·B·A);  s·B·A ← rank-r SVD of (W − deq(Q))
         so the adapter fits exactly the quantization error of the final Q.

The split is balanced, A = √(S/s)·Vᵀ and B = U·√(S/s), so s·B·A is the rank-r product whatever the
LoRA scale is, and A and B start at the same magnitude.

Such an adapter belongs to *its own* base Q, not to quantize(W): the run saves Q
(`residual_base.safetensors`, in the run and in its adapter folder) and merge and export load it from
there. An adapter for another base, or a residual that is missing or altered, is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_rt.base import formats as quant
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import lora_layers

INITS = ("default", "pissa", "loftq")
SVD = ("auto", "exact", "lowrank")
RESIDUAL = "residual_base.safetensors"
EXACT_UP_TO = 2048  # --svd auto: exact SVD while min(out, in) ≤ this; randomized above (4096² exact: ~20 s on CPU)


@dataclass(frozen=True)
class InitConfig:
    method: str = "default"
    loftq_iters: int = 1
    svd: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in INITS:
            raise QloraError(f"--init: expected one of {', '.join(INITS)}, got {self.method!r}")
        if not 1 <= self.loftq_iters <= 5:
            raise QloraError(f"--loftq-iters: expected 1..5, got {self.loftq_iters}")
        if self.svd not in SVD:
            raise QloraError(f"--svd: expected one of {', '.join(SVD)}, got {self.svd!r}")

    def describe(self) -> str:
        return f"loftq({self.loftq_iters})" if self.method == "loftq" else self.method


def low_rank(M: torch.Tensor, rank: int, svd: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factors of M (out, in) as (U·√S (out, r), √S·Vᵀ (r, in)), in fp32."""
    M = M.float()
    rank = min(rank, *M.shape)
    if svd == "lowrank" or (svd == "auto" and min(M.shape) > EXACT_UP_TO):
        # randomized: a few power iterations make the top singular vectors accurate for decaying spectra
        U, S, V = torch.svd_lowrank(M, q=min(rank + 10, *M.shape), niter=4)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    else:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    root = S.sqrt()
    return U * root, root[:, None] * Vh  # (out, r), (r, in)


def split(W: torch.Tensor, qcfg: quant.QuantConfig, rank: int, scale: float, cfg: InitConfig,
          device: torch.device) -> tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]:
    """(frozen base Q, A (r, in), B (out, r)) with deq(Q) + scale·B·A ≈ W, following `cfg.method`."""
    W = W.to(device, torch.float32)
    if cfg.method == "pissa":
        L, R = low_rank(W, rank, cfg.svd)
        base = quant.quantize(W - L @ R, qcfg, device)
    elif cfg.method == "loftq":
        L = R = None
        for _ in range(cfg.loftq_iters):
            base = quant.quantize(W if L is None else W - L @ R, qcfg, device)
            L, R = low_rank(W - quant.dequantize(base), rank, cfg.svd)
    else:
        raise QloraError(f"--init {cfg.method}: nothing to split (the default init quantizes W as it is)")
    root = scale ** -0.5  # scale·B·A = L·R
    return base, (R * root).contiguous(), (L * root).contiguous()


def relative_error(W: torch.Tensor, base: torch.Tensor, A: torch.Tensor | None = None,
                   B: torch.Tensor | None = None, scale: float = 0.0) -> float:
    """‖deq(base) + scale·B·A − W‖_F / ‖W‖_F: how far the layer starts from the full-precision weight."""
    approx = quant.dequantize(base).float()
    if A is not None:
        approx = approx + scale * (B.float() @ A.float())
    W = W.to(approx.device, torch.float32)
    return float(torch.linalg.norm(approx - W) / torch.linalg.norm(W))


class Plan:
    """What `lora.quantize_model` calls for each Linear: the targets get split, the rest quantized as usual.

    Holds the initial A and B until `apply` puts them into the attached adapters, and per layer the
    relative reconstruction error before (plain quantization) and after the split.
    """

    def __init__(self, cfg: InitConfig, qcfg: quant.QuantConfig, rank: int, scale: float, targets: set[str],
                 device: torch.device) -> None:
        self.cfg, self.qcfg, self.rank, self.scale, self.targets, self.device = cfg, qcfg, rank, scale, targets, device
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: dict[str, tuple[float, float]] = {}  # name: (plain, split)

    def __call__(self, name: str, W: torch.Tensor) -> torch.nn.Parameter | None:
        if name not in self.targets:
            return None
        base, A, B = split(W, self.qcfg, self.rank, self.scale, self.cfg, self.device)
        plain = relative_error(W, quant.quantize(W, self.qcfg, self.device))
        self.errors[name] = (plain, relative_error(W, base, A, B, self.scale))
        self.adapters[name] = (A, B)
        return base

    def apply(self, model: torch.nn.Module) -> None:
        """Copy the initial A and B into the adapters `add_adapters` attached (same targets, same rank)."""
        layers = lora_layers(model)
        with torch.no_grad():
            for name, (A, B) in self.adapters.items():
                layers[name].lora_A.weight.copy_(A)
                layers[name].lora_B.weight.copy_(B)
        self.adapters.clear()

    def summary(self) -> str:
        plain = sum(p for p, _ in self.errors.values()) / max(len(self.errors), 1)
        after = sum(s for _, s in self.errors.values()) / max(len(self.errors), 1)
        return (f"init {self.cfg.describe()} on {len(self.errors)} layers: mean relative reconstruction error "
                f"{100 * after:.3f}% (plain {self.qcfg.format}: {100 * plain:.3f}%)")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_residual(model: torch.nn.Module, names: list[str], path: Path, meta: dict[str, str]) -> str:
    """Write the split layers' frozen bases; returns the digest that ties adapters to this residual."""
    layers = lora_layers(model)
    tensors = {f"{name}.{k}": v for name in names for k, v in quant.state_tensors(layers[name].weight).items()}
    digest = _digest(tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**meta, "residual.digest": digest, "residual.layers": json.dumps(names)})
    tmp.replace(path)  # a crash mid-write leaves no half file under the real name
    return digest


def require_residual(path: Path, init: str = "PiSSA/LoftQ") -> None:
    """The one message for a residual base that is not where its adapter or run says it is."""
    if not path.is_file():
        raise QloraError(f"{path} is missing: this adapter was initialised with {init} and belongs to its own "
                         "residual base, which the run saved in its adapter folder; copy the whole folder")


def load_residual(model: torch.nn.Module, path: Path, qcfg: quant.QuantConfig, device: torch.device,
                  digest: str | None = None, fingerprint: str | None = None) -> str:
    """Replace the frozen bases of the layers saved in `path`; checks digest, base and shapes first."""
    require_residual(path)
    try:
        with safe_open(str(path), framework="pt") as h:
            meta = h.metadata() or {}
            tensors = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:
        raise QloraError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
    found = _digest(tensors)
    if found != meta.get("residual.digest") or (digest and found != digest):
        raise QloraError(f"{path}: residual base does not match its adapter (digest {found}, expected "
                         f"{digest or meta.get('residual.digest')}); it was altered or belongs to another run")
    if fingerprint and meta.get("base.fingerprint") not in (None, fingerprint):
        raise QloraError(f"{path}: residual base was made from a different base model than the one given")
    layers = lora_layers(model)
    names = json.loads(meta.get("residual.layers", "[]"))
    for name in names:
        if name not in layers:
            raise QloraError(f"{path}: holds {name}, which is not a Linear of this base model")
        part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        weight = quant.from_state_tensors(part, qcfg, device)
        if tuple(quant.dequantize(weight).shape) != (layers[name].out_features, layers[name].in_features):
            raise QloraError(f"{path}: {name} does not have the shape of this base model's layer")
        layers[name].weight = weight
    return found
