"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    runs/X/checkpoint/adapter_model.safetensors   A and B, under PEFT's key names as in adapter/
    runs/X/checkpoint/trainer_state.pt            optimizer, scheduler, RNG states, data position, step

    runs/X/checkpoint/progress.json               step, data position, settings, base and data fingerprints
    runs/X/checkpoint/digests.json                the SHA-256 of each file above, written with them

The state file holds tensors and plain Python values only and is read with `weights_only=True`:
nothing is unpickled. The folder is replaced atomically, so an interrupted save leaves the previous
checkpoint in place.

The checkpoint before the newest stays beside it as `checkpoint.prior`. A resume checks the newest against its
digests: a damaged one (a bad disk, a partial copy: bytes changed that no reader would notice) is passed over
for the prior one, said in one line; where neither is whole, the resume is refused, naming the file. A run that
diverges right after a checkpoint (its weights already blown up) falls back to the prior one too, instead of
naming a dead end.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora_rt.base.encoders import load_head
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, resolve, write_json
from qlora_rt.lora.layers import lora_layers
from qlora_rt.lora.peft_io import PREFIX, adapter_tensors

ADAPTER, STATE, PROGRESS, DIGESTS = "adapter_model.safetensors", "trainer_state.pt", "progress.json", "digests.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prior(folder: Path) -> Path:
    return folder.with_name(folder.name + ".prior")


def damage(found: Path) -> str | None:
    """What is wrong with a checkpoint folder's files against its digests (None: whole, or from before digests).
    Checked once per folder as it is on disk (a resume asks several times; an 8B run's state is GBs)."""
    try:
        stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(found.iterdir()))
    except OSError:
        stats = ()
    return _damage(found, stats)


@functools.lru_cache(maxsize=8)
def _damage(found: Path, stats: tuple) -> str | None:
    try:
        digests = json.loads((found / DIGESTS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{found / DIGESTS} is unreadable"
    for name, want in digests.items():
        try:
            got = _sha256(found / name)
        except OSError as e:
            return f"{found / name} is unreadable ({e.strerror or e})"
        if got != want:
            return f"{found / name} does not match its digest (changed on disk since it was written)"
    return None


def candidates(folder: Path) -> list[Path]:
    """The complete checkpoints, newest first: the folder (or its copy set aside mid-replace), the prior one."""
    found = [p for p in (resolve(folder), _prior(folder)) if p is not None and (p / STATE).exists()]
    return list(dict.fromkeys(found))


def latest(folder: Path) -> Path | None:
    """The newest whole checkpoint (see `damage`); None where there is none. Where checkpoints exist but
    none is whole, the resume is refused, naming what is damaged."""
    found = candidates(folder)
    for path in found:
        if damage(path) is None:
            return path
    if found:
        raise QloraError(f"--resume: no whole checkpoint in {folder}: {damage(found[0])}; the run cannot continue "
                         "from it (start it again, or restore the folder from a copy)")
    return None


def passed_over(folder: Path) -> str | None:
    """A line saying which damaged newer checkpoint `latest` passed over, if it did."""
    found = candidates(folder)
    chosen = latest(folder)
    if not found or chosen == found[0]:
        return None
    step = progress(folder)["step"]
    return f"{found[0]}: {damage(found[0])}; continuing from the checkpoint before it, at step {step}"


def progress(folder: Path) -> dict | None:
    """The progress dict of the newest checkpoint (step, data position, settings), without loading tensors."""
    found = latest(folder)
    if found is None:
        return None
    if (found / PROGRESS).is_file():
        return json.loads((found / PROGRESS).read_text())
    return torch.load(found / STATE, weights_only=True, map_location="cpu")["progress"]  # older checkpoints


def save(folder: Path, model: torch.nn.Module, optimizer_state: dict, scheduler, progress: dict,
         rng: list[dict] | None = None) -> None:
    """optimizer_state: the optimizer's state dict (FSDP: the whole one, distributed.gathered).
    rng: each process's RNG state, in rank order (several processes); default: this process's."""
    tensors = adapter_tensors(model)  # the same tensors and PEFT key names as the final adapter
    rng = rng or [rng_state()]
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng[0],
             "progress": progress}
    if len(rng) > 1:
        state["rng_ranks"] = rng
    buffer = io.BytesIO()  # serialized first, so that a full disk is a plain OSError, not torch's "unexpected pos"
    torch.save(state, buffer)
    # the current checkpoint becomes the fallback once the new one is in place
    with atomic_dir(folder, keep=_prior(folder)) as tmp:
        save_file(tensors, str(tmp / ADAPTER))
        (tmp / STATE).write_bytes(buffer.getvalue())
        write_json(tmp / PROGRESS, progress)
        write_json(tmp / DIGESTS, {name: _sha256(tmp / name) for name in (ADAPTER, STATE, PROGRESS)})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def discard_latest(folder: Path) -> int | None:
    """The newest checkpoint led straight to a non-finite loss: drop it, restore the prior one; its step."""
    found = candidates(folder)  # the prior itself, when a crash left no newer one: then none is good
    if found:
        shutil.rmtree(found[0])
    if _prior(folder).exists():
        os.replace(_prior(folder), folder)
    try:
        saved = progress(folder)
    except QloraError:  # the prior is damaged too: nothing to fall back on
        return None
    return saved["step"] if saved else None


def read(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The newest checkpoint: (its folder, adapter tensors, trainer state)."""
    found = latest(folder)
    if found is None:
        raise QloraError(f"--resume: no checkpoint in {folder}; start the run without --resume")
    try:
        tensors = load_file(str(found / ADAPTER))
        state = torch.load(found / STATE, weights_only=True, map_location="cpu")
    except Exception as e:
        raise QloraError(f"{found}: checkpoint is unreadable ({str(e).splitlines()[0]})") from None
    return found, tensors, state


def restore_weights(found: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """The checkpoint's adapter (and an encoder's head) into the model, checked against this run's layout."""
    layers = lora_layers(model)
    if set(tensors) != set(adapter_tensors(model)):
        raise QloraError(f"{found}: checkpoint adapter does not match this run's targets/rank; "
                         "was the run's config changed?")
    head = {k.removeprefix(PREFIX): t for k, t in tensors.items() if ".lora_" not in k}
    if head:  # an encoder's classification head, trained in full
        load_head(model, head, str(found))
    with torch.no_grad():
        for key, t in tensors.items():
            if ".lora_" not in key:
                continue
            owner, ab = key.removeprefix(PREFIX).rsplit(".lora_", 1)
            target = getattr(layers[owner], f"lora_{ab[0]}").weight
            if target.shape != t.shape:
                raise QloraError(f"{found}: {key} has shape {tuple(t.shape)}, this run expects {tuple(target.shape)}")
            target.copy_(t)


def restore_state(state: dict, load_optimizer: Callable[[dict], None], scheduler, rank: int = 0) -> dict:
    """Optimizer (through `load_optimizer`), scheduler and this rank's RNG; the saved progress dict."""
    load_optimizer(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"])
    return state["progress"]
