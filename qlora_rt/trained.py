"""The model as it was trained: the 4-bit base rebuilt exactly (format, residual base) with its adapter.

Merge and export start from here; nothing they do changes it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from qlora_rt.base.formats import QuantConfig
from qlora_rt.base.load import Loaded, family, load
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import quantize_model
from qlora_rt.lora.peft_io import CHANGES_BASE, AdapterInfo, labels_of, load_adapter, read_adapter, read_head
from qlora_rt.lora.svd_init import RESIDUAL, load_residual, require_residual


class TrainedModel(NamedTuple):
    loaded: Loaded  # the model (4-bit base, adapter attached), its tokenizer, source and fingerprint
    quant: QuantConfig  # the base's 4-bit format, as the adapter recorded it
    adapter: AdapterInfo | None  # None: the bare base


def open_trained(model_path: str | Path, adapter: str | Path | None = None, quant_format: str | None = None,
                 device: torch.device | str = "cpu") -> TrainedModel:
    """The quantized base with its adapter, exactly as it was trained: what merge and export start from.

    The base's 4-bit format comes from the adapter's metadata; `quant_format` overrides it (needed for
    adapters from PEFT, which do not record it; those default to NF4 with double quantization). A bare base
    takes `train`'s default format (`bare_base`).
    """
    cfg, meta = base_config(model_path, adapter, quant_format)
    labels = labels_of(meta, read_head(adapter), Path(adapter)) if adapter else None
    if not adapter and family(model_path).trained_head:
        labels = ["LABEL_0", "LABEL_1"]  # a bare base: a placeholder head (an adapter-aware export takes each's)
    loaded = load(model_path, lazy=True, labels=labels)
    quantize_model(loaded.model, cfg, torch.device(device), loaded.gguf, tensors=loaded.tensors)
    info = load_adapter(loaded.model, adapter, loaded.fingerprint) if adapter else None
    if "base.residual" in meta:  # PiSSA/LoftQ: the run's residual base replaces quantize(W)
        load_residual(loaded.model, Path(adapter) / RESIDUAL, cfg, torch.device(device), meta["base.residual"],
                      loaded.fingerprint)
    return TrainedModel(loaded, cfg, info)


def base_config(model_path: str | Path, adapter: str | Path | None = None, quant_format: str | None = None,
                int4_compute: str | None = None) -> tuple[QuantConfig, dict[str, str]]:
    """The base's 4-bit configuration (see open_trained) and the adapter's metadata, read from the adapter's
    files alone: what can be checked before a model loads. int4_compute: refused unless the base is int4."""
    config, meta = read_adapter(adapter) if adapter else ({}, {})
    if adapter:
        check_own_base(adapter, config, meta)
    cfg = QuantConfig.from_metadata(meta) or (QuantConfig() if adapter else bare_base(model_path))
    if quant_format and quant_format != cfg.format:
        if "quant.format" in meta:
            raise QloraError(f"--quant {quant_format}: the adapter was trained on a {cfg.format} base; "
                             f"merging it onto another base would not give the trained model")
        cfg = QuantConfig(format=quant_format)
    if int4_compute and int4_compute != cfg.int4_compute:
        if cfg.format != "int4":
            raise QloraError(f"--int4-compute {int4_compute}: the base was trained as {cfg.format}; only an int4 "
                             "base's products have a compute type to choose")
        cfg = replace(cfg, int4_compute=int4_compute)
    return cfg, meta


def bare_base(model_path: str | Path) -> QuantConfig:
    """A base with no adapter in the format `train` gives it by default (`--quant auto`), so that the adapters
    trained with the defaults fit its adapter-aware export."""
    return QuantConfig(format="int4", gguf="file", head=family(model_path).quantizable_head)


def check_own_base(path: str | Path, config: dict, meta: dict[str, str]) -> None:
    """A PiSSA/LoftQ adapter needs its residual base beside it; say so before any model is loaded."""
    if "base.residual" in meta:
        require_residual(Path(path) / RESIDUAL, meta.get("init", "PiSSA/LoftQ"))
        return
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(CHANGES_BASE):
        raise QloraError(f"--adapter {path}: init_lora_weights={init!r} means the adapter belongs to its own "
                         f"residual base, and the folder has no qlora-rt {RESIDUAL} holding it; on the original "
                         "base the adapter would give wrong answers")
