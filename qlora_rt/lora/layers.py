"""One LoRA layer class, and the walk that puts it into a transformers model.

    y = base(x) + s · B(A(dropout(x)))        s = alpha / r   (rsLoRA: alpha / √r)

`LoRALinear` replaces every `nn.Linear` of the decoder (the output head excepted, as QLoRA does; with
--quant-head the head becomes a frozen `QuantLinear`, the same without an adapter). Its `weight` is the
frozen base in whatever format `qlora_rt.base.formats` gave it, under the base's own state-dict key; a layer
that is not targeted simply has no adapter (rank 0). A and B are ordinary fp32 `nn.Linear`s named
`lora_A` / `lora_B`, so parameter names already match PEFT's saved keys.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_rt.base import formats as quant
from qlora_rt.base.linears import linear_names, output_head
from qlora_rt.base.memory import release_freed_memory
from qlora_rt.errors import QloraError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    targets: str = "all-linear"

    def scale(self, rank: int | None = None) -> float:
        return lora_scale(self.alpha, rank or self.rank, self.rslora)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is in a `qlora_rt.base.formats` format (the output head with --quant-head)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias
        self.rank = 0  # no adapter
        self.product_dtype: torch.dtype | None = None  # None: the input's; bf16: see `use_bf16_products`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant.linear(x, self.weight, self.bias, self.product_dtype)

    def extra_repr(self) -> str:
        base = quant.format_of(self.weight).describe(self.weight)
        return f"in={self.in_features}, out={self.out_features}, base={base}"


class LoRALinear(QuantLinear):
    """A frozen (possibly 4-bit) Linear with an optional trainable low-rank update."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, in_features: int, out_features: int) -> None:
        super().__init__(weight, bias, in_features, out_features)
        self.scale = 0.0
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None
        self.dropout: nn.Module = nn.Identity()
        self.active = True  # False: behave as the base alone (see `disabled`)

    def attach(self, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
               dtype: torch.dtype = torch.float32) -> None:
        """Give this layer a fresh adapter: A Kaiming-uniform (as PEFT and nn.Linear), B zero, so s·B·A = 0."""
        if rank <= 0:
            raise QloraError(f"--rank must be a positive integer, got {rank}")
        device = self.weight.device
        self.rank, self.scale = rank, lora_scale(alpha, rank, rslora)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        self.train(self.training)  # new submodules start in training mode; follow this layer's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.lora_A is None or not self.active:
            return y
        # The adapter runs in its own (fp32) dtype even when the base computes in bf16.
        h = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))  # (..., r)
        return y + (self.lora_B(h) * self.scale).to(y.dtype)  # (..., out)

    def extra_repr(self) -> str:
        fmt = quant.format_of(self.weight).describe(self.weight)
        return f"in={self.in_features}, out={self.out_features}, base={fmt}, rank={self.rank}, scale={self.scale:g}"


class LoraDropout(nn.Dropout):
    """nn.Dropout on the adapter's input, with a cheaper mask on the CPU: 16 random bits an element, four taken
    from each 64-bit draw of the default generator, against torch's bernoulli_ (which drew one number an
    element and was a large share of a CPU training step). p is then rounded to a multiple of 1/65536 and the
    kept values scaled by 1/(1 - that p), so the expectation is unchanged. Elsewhere it is nn.Dropout.
    Gradient checkpointing replays the same masks: they come from the default generator, whose state
    torch.utils.checkpoint restores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        dropped = round(self.p * 65536)  # of every 65536 equally likely 16-bit values
        if dropped >= 65536:
            return x * 0
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
        keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
        return (x * keep).mul_(65536 / (65536 - dropped))


def bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16), where a bf16 product is
    several times faster than an fp32 one."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def use_bf16_products(model: nn.Module) -> int:
    """Training on a CPU with bf16 matrix units: every frozen 4-bit product runs in bf16 (the weight dequantized
    straight to bf16, the input rounded to bf16, the result back in fp32), forward and backward, as PEFT's
    `bnb_4bit_compute_dtype=bfloat16` does (a head in 4 bits too, --quant-head). The adapters, their gradients,
    the optimizer, norms, attention and an unquantized head stay fp32. Merge and export rebuild the model with
    exact fp32 products. Returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and quant.is_quantized(m.weight)]
    for layer in layers:
        layer.product_dtype = torch.bfloat16
    return len(layers)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its quantized base alone, e.g. to compare answers before and after training."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.active = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.active = True


def quantize_model(
    model: nn.Module,
    cfg: quant.QuantConfig,
    device: torch.device,
    gguf=None,
    split: Callable[[str, torch.Tensor], nn.Parameter | None] | None = None,
    tensors=None,
) -> nn.Module:
    """Freeze the model, move it to `device`, and turn every decoder Linear into a quantized LoRALinear.

    The output head (and the tied embedding) stay in the compute dtype, as in QLoRA: they are the
    layers most sensitive to quantization and, tied, they are also the input embedding.
    gguf: the file the weights came from; with int4 its tensors are used as stored (QuantConfig.gguf).
    split: called with each Linear's name and full-precision weight before it is freed; a Parameter it
    returns is the frozen base instead of quantize(W) (PiSSA/LoftQ residuals, qlora_rt/lora/svd_init.py).
    tensors: where a lazily loaded model's Linear weights are (`load(..., lazy=True)`): each is read, in
    fp32, only when it is quantized.
    """
    imported = quant.FORMATS[cfg.format].import_gguf(gguf, model.config, cfg) if gguf is not None else {}
    model.requires_grad_(False)
    # names only: holding the modules themselves would keep every fp32 weight alive until the end
    for name in linear_names(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        own = imported.pop(name, None)
        full, bias = child.weight.data, child.bias
        if full.is_meta:  # a lazy load: this Linear's weight is read now and freed after quantizing; not at all
            # where its int4 bytes come from the GGUF file as they are
            full = tensors.get(f"{name}.weight") if own is None or split else None
            bias = None if bias is None else tensors.get(f"{name}.bias")
        weight = split(name, full) if split else None
        if weight is None:
            weight = quant.quantize(full, cfg, device, own)
        bias = None if bias is None else nn.Parameter(bias.data.to(device, cfg.compute_dtype), requires_grad=False)
        layer = LoRALinear(weight, bias, child.in_features, child.out_features).train(child.training)
        setattr(parent, child_name, layer)
        del child, full  # the last references: its fp32 weight is freed now
        if tensors is not None:
            release_freed_memory()
    if cfg.head:
        quantize_head(model, cfg, device, tensors, imported.pop("lm_head", None))
    return _move_unquantized(model, device, cfg.compute_dtype)


def quantize_head(model: nn.Module, cfg: quant.QuantConfig, device: torch.device, tensors=None, own=None) -> None:
    """--quant-head: the decoder's output head becomes a frozen QuantLinear in the base's format. A head tied
    to the input embedding is untied: the embedding stays in full precision (a lookup reads one row a
    token), the head is quantized from the same values (`tie_word_embeddings` is then false, in the
    config a merge writes too). The head is the largest matrix of small models (SmolLM2-135M: 28M of
    135M parameters) and every decoded token reads all of it. own: the head's bytes as a GGUF file stores them
    (its Q8_0 or Q6_K head is kept so, not rounded to 4 bits)."""
    head = output_head(model)
    if not isinstance(head, nn.Linear) or model.get_input_embeddings() is None:
        raise QloraError("--quant-head: this model has no output head to quantize (an encoder's classification "
                         "head is trained in full)")
    full = head.weight.data
    if full.is_meta and own is None:
        full = tensors.get("lm_head.weight")
    bias = None if head.bias is None else nn.Parameter(head.bias.data.to(device, cfg.compute_dtype),
                                                       requires_grad=False)
    layer = QuantLinear(quant.quantize(full, cfg, device, own), bias, head.in_features, head.out_features)
    model.set_output_embeddings(layer)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def _move_unquantized(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move embeddings, norms and head to device and compute dtype; shared (tied) weights stay shared."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module.named_parameters(recurse=False):
            if not quant.is_quantized(p):
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.data.to(device, dtype), requires_grad=False)
                module._parameters[key] = moved[id(p)]
        for key, b in module.named_buffers(recurse=False):
            # rotary inverse frequencies stay fp32, as transformers keeps them
            keep = not b.is_floating_point() or "inv_freq" in key
            module._buffers[key] = b.to(device) if keep else b.to(device, dtype)
    return model


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Module names an adapter goes on: `all-linear`, `attention`, or a comma list of leaf names."""
    return select_targets(list(lora_layers(model)) or linear_names(model), spec)


def select_targets(names: list[str], spec: str) -> list[str]:
    leaf = {name: name.rsplit(".", 1)[-1] for name in names}
    if spec == "all-linear":
        return list(names)
    wanted = set(ATTENTION) if spec == "attention" else {s.strip() for s in spec.split(",") if s.strip()}
    available = sorted(set(leaf.values()))
    unknown = sorted(wanted - set(available))
    if unknown or not wanted:
        raise QloraError(f"--targets: {', '.join(unknown) or repr(spec)} not found in the model; "
                         f"expected all-linear, attention, or names among {', '.join(available)}")
    return [name for name in names if leaf[name] in wanted]


def add_adapters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Attach fresh adapters to the layers `cfg.targets` names; returns their module names."""
    names = resolve_targets(model, cfg.targets)
    layers = lora_layers(model)
    for name in names:
        layers[name].attach(cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) where a 4-bit weight counts its logical (unpacked) size."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            total += module.in_features * module.out_features if (
                isinstance(module, QuantLinear) and p is module.weight) else p.numel()
    return trainable, total
