"""LoRA adapters as onnxruntime `.onnx_adapter` files, bound to the graph's LoRA inputs by name.

An adapter file holds `<module>.lora_A` (r, in) and `<module>.lora_B` (r, out, scale folded in) for
the modules it adapts (q/k/v and gate/up share an A, and a B or one B each: export/weight_writers.py
`group_lora`, laid out as the export's LoRA inputs are); the
graph's other LoRA inputs keep their rank-0 defaults. A plain session activates one per run with
`RunOptions.add_active_adapter`; the runtime, which needs I/O binding, binds the file's tensors itself.
Either way switching adapters never reloads the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qlora_rt.base.formats import QuantConfig
from qlora_rt.errors import QloraError
from qlora_rt.lora.peft_io import labels_of, read_head, read_lora
from qlora_rt.runtime import manifest
from qlora_rt.runtime.manifest import Manifest
from qlora_rt.runtime.session import ADAPTER_DIR, adapter_model_version, check_fits, legacy_lora
from qlora_rt.runtime.session import ADAPTER_SUFFIX as SUFFIX

from .encoder_graph import BASES, head_arrays
from .weight_writers import group_lora, lora_arrays


def adapter_arrays(adapter: str | Path, export_meta: Manifest) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """An adapter folder's metadata, and its tensors named and laid out as the export's LoRA inputs (and, for
    an encoder, its head and label names as the head inputs)."""
    _, meta, lora = read_lora(adapter)
    pairs = {name: lora_arrays(A, B, scale) for name, (A, B, scale) in lora.items()}
    arrays = group_lora(pairs, export_meta.lora_groups, export_meta.lora_inputs)
    if legacy_lora(export_meta.lora_inputs):  # an export of an older qlora-rt takes A as (in, r)
        arrays = {k: v.T.copy() if k.endswith(".lora_A") else v for k, v in arrays.items()}
    if export_meta.family == "encoder":
        head = read_head(adapter)
        if not head:
            raise QloraError(f"--adapter {adapter}: has no classification head (modules_to_save); this export is a "
                             "classifier, whose head each adapter brings")
        try:
            arrays.update(head_arrays(head, labels_of(meta, head, Path(adapter)), BASES[export_meta.model_type]))
        except KeyError as e:
            raise QloraError(f"--adapter {adapter}: its head lacks {e}; made for another architecture?") from None
    return meta, arrays


def check_base(adapter_meta: dict[str, str], export_meta: Manifest, where: str) -> None:
    """The adapter must have been trained on this export's base: same weights, same 4-bit format."""
    stored = adapter_meta.get("base.fingerprint")
    if stored and stored != export_meta.base_fingerprint:
        raise QloraError(f"{where}: was trained on a different base model than this export's "
                         f"({export_meta.base_model})")
    mine, theirs = adapter_meta.get("base.residual"), export_meta.base_residual
    if mine and mine != theirs:
        raise QloraError(f"{where}: was initialised with {adapter_meta.get('init', 'PiSSA/LoftQ')} and belongs to its "
                         "own residual base, not this export's; export it with `qlora-rt export --adapter` instead")
    if theirs and not mine:
        raise QloraError(f"{where}: this export's base is a PiSSA/LoftQ residual base; an adapter trained on the "
                         "plain base does not fit it")
    trained = QuantConfig.from_metadata(adapter_meta)
    fmt = trained.base_name if trained else None
    if fmt and fmt != export_meta.base_quant:
        raise QloraError(f"{where}: was trained on a {fmt} base; this export's base was trained as "
                         f"{export_meta.base_quant}")


def write_adapter(arrays: dict[str, np.ndarray], path: Path, export_meta: Manifest) -> Path:
    """The file's model version identifies the base it was trained on, so the runtime can refuse a wrong one."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(adapter_model_version(export_meta))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))
    return path


def export_adapter(adapter: str, onnx_dir: str, name: str, overwrite: bool = False) -> Path:
    """Add another trained adapter to an existing adapter-aware export, without re-exporting the model."""
    folder = Path(onnx_dir)
    try:
        meta = manifest.read(folder)
    except QloraError as e:
        raise QloraError(f"--onnx: {e}") from None
    if meta.mode != "adapter-aware":
        raise QloraError(f"--onnx: {folder} is a merged export; adapters need an adapter-aware export")
    target = folder / ADAPTER_DIR / f"{name}{SUFFIX}"
    if target.exists() and not overwrite:
        raise QloraError(f"--name: an adapter named {name!r} already exists in {folder}; pick another name "
                         "or pass --overwrite")
    adapter_meta, arrays = adapter_arrays(adapter, meta)
    check_base(adapter_meta, meta, f"--adapter {adapter}")
    check_fits({k: v.shape for k, v in arrays.items()}, meta.lora_inputs, f"--adapter {adapter}")
    return write_adapter(arrays, target, meta)
