"""What every runtime verb shares: an export's onnxruntime session, and its adapter files (found by name,
checked against the export's base and LoRA inputs, read once)."""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qlora_rt.errors import QloraError
from qlora_rt.runtime.manifest import Manifest

ADAPTER_DIR, ADAPTER_SUFFIX = "adapters", ".onnx_adapter"
HEAD_LABELS = "head.label_names"  # a classifier adapter's label names (JSON bytes): a graph input it overrides


def adapter_model_version(meta: Manifest) -> int:
    """The id an adapter file carries of the base it was trained on (ORT stores one int: the model version)."""
    base = f"{meta.base_fingerprint}:{meta.base_quant}"
    if meta.base_residual:  # a PiSSA/LoftQ base is its own base
        base += f":{meta.base_residual}"
    return zlib.crc32(base.encode()) & 0x7FFFFFFF


def legacy_lora(lora_inputs: dict[str, list]) -> bool:
    """Whether an export takes its lora_A inputs as exports before 2026-12-07 did, (in, r), its x·A taken
    row-wise (which rounded otherwise in a batch than alone); today's take PEFT's (r, in). B is (r, out) in both."""
    fixed = next((f for k, f in lora_inputs.items() if k.endswith(".lora_A")), [None, 0])
    return fixed[0] is not None


def a_rank_axis(lora_inputs: dict[str, list]) -> int:
    """The axis that holds the rank in an export's lora_A inputs (lora_B's is 0 in every layout)."""
    return 1 if legacy_lora(lora_inputs) else 0


def check_fits(shapes: dict[str, list[int]], lora_inputs: dict[str, list], where: str) -> None:
    """Every tensor of an adapter must name a LoRA input of the export and fit its fixed dimension."""
    for key, shape in shapes.items():
        if key not in lora_inputs:
            raise QloraError(f"{where}: adapts {key.rsplit('.', 1)[0]}, which has no LoRA input in this export "
                             "(made for another model, or exported for other target modules?)")
        fixed = lora_inputs[key]  # (None, in) for A, (None, out) for B; a classifier head's: None = its labels

        def fits(dims) -> bool:
            return len(dims) == len(fixed) and all(f is None or f == d for f, d in zip(fixed, dims))
        if key.endswith(".lora_A") and not fits(shape) and fits(list(shape)[::-1]):
            raise QloraError(f"{where}: {key} is laid out as adapters written for exports of another qlora-rt "
                             "are (transposed); write the adapter again for this export with "
                             "`qlora-rt export-adapter`")
        if not fits(shape):
            raise QloraError(f"{where}: {key} has shape {list(shape)}, this export expects {fixed}: "
                             "it was made for another model")


def open_session(folder: Path, threads: int = 0) -> ort.InferenceSession:
    """The folder's model.onnx on the CPU; a file onnxruntime cannot load is one line."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the LoRA (and head) inputs' initializers are meant to be overridable
    cores = os.cpu_count() or 1
    if threads > cores:  # more threads than cores only wait on each other: far slower, never faster
        raise QloraError(f"--threads {threads}: this machine has {cores} CPU threads; use at most {cores} "
                         "(0 = onnxruntime's default, one per core)")
    opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types; the first line says what it could not read
        raise QloraError(f"{folder / 'model.onnx'}: onnxruntime cannot load it "
                         f"({str(e).strip().splitlines()[0][:300]}); export it again") from None


def adapter_names(folder: Path) -> list[str]:
    return sorted(p.name[: -len(ADAPTER_SUFFIX)] for p in (folder / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}"))


def find_adapter(folder: Path, name_or_path: str | Path) -> Path:
    """A name under FOLDER/adapters/, or a path to an .onnx_adapter file: the file, resolved."""
    path = Path(name_or_path)
    if not str(name_or_path).endswith(ADAPTER_SUFFIX):
        path = folder / ADAPTER_DIR / f"{name_or_path}{ADAPTER_SUFFIX}"
        if not path.is_file():
            raise QloraError(f"--adapter: no adapter named {str(name_or_path)!r} in {folder} "
                             f"(available: {', '.join(adapter_names(folder)) or 'none'})")
    if not path.is_file():
        raise QloraError(f"--adapter: {path} does not exist")
    return path.resolve()


MAX_ADAPTER_VALUE = 65504.0  # fp16's largest: a trained LoRA's values are far smaller (see check_adapter_values)


def max_adapter_bytes(meta: Manifest) -> int:
    """The largest file an adapter of this export can be: every LoRA input at rank max(hidden, 1024) (no Linear
    of the model has a useful rank above its hidden size) in fp32, plus 16 MiB for its metadata."""
    rank = max(meta.hidden or 0, 1024)
    return 4 * rank * sum(math.prod(d for d in dims if d is not None) for dims in meta.lora_inputs.values()) \
        + (16 << 20)


def file_signature(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: a cached read of it is then stale."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_adapter_file(path: Path, meta: Manifest) -> dict[str, ort.OrtValue]:
    """An .onnx_adapter file's tensors, after checking they were made for this export's base and fit its inputs."""
    size, most = path.stat().st_size, max_adapter_bytes(meta)
    if size > most:  # before reading a byte: a huge (or sparse) file is refused at once
        raise QloraError(f"--adapter: {path.name} is {size / 2**20:,.0f} MiB; an adapter of this export is at most "
                         f"{most / 2**20:,.0f} MiB (every LoRA input at full rank): not an adapter for it")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # onnxruntime raises its own error types for a bad flatbuffer
        raise QloraError(f"--adapter: {path} is not a readable .onnx_adapter file ({e})") from None
    if fmt.get_model_version() != adapter_model_version(meta):
        raise QloraError(f"--adapter: {path.name} was made for another base model (or 4-bit format) than this "
                         f"export's {meta.base_model} ({meta.base_quant})")
    # onnxruntime before 1.28 hands tensors that point into `fmt`'s own buffer, freed with it (a segfault
    # at the next run): hold each in an array of its own
    params = {k: ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy())) for k, v in fmt.get_parameters().items()}
    where = f"--adapter: {path.name}"
    check_fits({k: v.shape() for k, v in params.items()}, meta.lora_inputs, where)
    check_adapter_values(params, where, meta.lora_groups, a_rank_axis(meta.lora_inputs))
    return params


def check_adapter_values(params: dict[str, ort.OrtValue], where: str, groups: dict[str, list] | None = None,
                         a_axis: int = 0) -> None:
    """What shapes alone do not say: fp32 tensors (the label names: UTF-8 JSON bytes), each A of the rank
    of its B (of its members' Bs, stacked, where a group takes one B per member: `groups`, the export's
    lora_groups; A's rank on `a_axis`: a_rank_axis), no NaN or infinity (which would answer `nan`
    or nothing, silently), and no value beyond ±MAX_ADAPTER_VALUE."""
    import json

    import numpy as np

    for key, v in params.items():
        if key == HEAD_LABELS:
            try:
                names = json.loads(bytes(v.numpy()).decode())
            except (UnicodeDecodeError, ValueError):
                raise QloraError(f"{where}: its label names are not UTF-8 JSON; export the adapter again") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise QloraError(f"{where}: its label names are not a list of strings; export the adapter again")
            continue
        if v.data_type() != "tensor(float)":
            raise QloraError(f"{where}: {key} holds {v.data_type()[7:-1]}, this export takes float32 tensors")
        if key.endswith(".lora_A"):
            b = params.get(key[: -len("A")] + "B")
            if b is not None and v.shape()[a_axis] != b.shape()[0]:
                raise QloraError(f"{where}: {key} has rank {v.shape()[a_axis]} and its lora_B rank "
                                 f"{b.shape()[0]}: not one adapter")
        a = v.numpy()
        if not np.isfinite(a).all():
            raise QloraError(f"{where}: {key} holds NaN or infinite values (a diverged training run?); it would "
                             "answer nothing useful")
        # a huge finite value could overflow another row's x·A in a step shared with other adapters (serve):
        # within ±65504, that needs an input ~1e33, which no row of a working model holds
        if a.size and (peak := float(np.abs(a).max())) > MAX_ADAPTER_VALUE:
            raise QloraError(f"{where}: {key} holds values up to {peak:.3g}; an adapter's values must lie within "
                             f"±{MAX_ADAPTER_VALUE:g} (fp16's range; a trained LoRA's are far smaller)")
    for group, members in (groups or {}).items():  # a group with a B per member: A's rank is theirs, side by side
        bs = [f"{m}.lora_B" for m, _ in members]
        if f"{group}.lora_B" in params or not any(k in params for k in [f"{group}.lora_A", *bs]):
            continue
        ranks = [params[b].shape()[0] if b in params else None for b in bs]
        a = params.get(f"{group}.lora_A")
        if a is None or None in ranks or len(set(ranks)) > 1 or a.shape()[a_axis] != sum(ranks):
            raise QloraError(f"{where}: {group}.lora_A has rank {a.shape()[a_axis] if a is not None else 'none'} and "
                             f"its members' lora_B ranks {ranks}: not one adapter")


def release_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc keeps them for reuse otherwise, so a server's
    memory would not fall after an adapter is unloaded)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
