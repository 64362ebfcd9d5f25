"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    runs/X/checkpoint/adapter_model.safetensors   A and B, under PEFT's key names as in adapter/
    runs/X/checkpoint/trainer_state.pt            optimizer, scheduler, RNG states, data position, step

    runs/X/checkpoint/progress.json               step, data position, settings, base and data fingerprints

The state file holds tensors and plain Python values only and is read with `weights_only=True`:
nothing is unpickled. The folder is replaced atomically, so an interrupted save leaves the previous
checkpoint in place.

A checkpoint is trusted only once a step has run from it with a finite loss and gradient: until then
the one before it stays beside it as `checkpoint.prior`. A run that diverges right after a checkpoint
(its weights already blown up) falls back to the prior one instead of naming a dead end.
"""

from __future__ import annotations

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

ADAPTER, STATE, PROGRESS = "adapter_model.safetensors", "trainer_state.pt", "progress.json"


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


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint: the folder, its copy set aside mid-replace, or the prior one."""
    found = resolve(folder)
    if found is None and _prior(folder).exists():
        found = _prior(folder)
    return found if found is not None and (found / STATE).exists() else None


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
    # every step since the current checkpoint ran finite: once the new one is in place, it is the fallback
    with atomic_dir(folder, keep=_prior(folder)) as tmp:
        save_file(tensors, str(tmp / ADAPTER))
        (tmp / STATE).write_bytes(buffer.getvalue())
        write_json(tmp / PROGRESS, progress)


def confirm(folder: Path) -> None:
    """A step ran from the newest checkpoint with a finite loss and gradient: the prior one is not needed."""
    shutil.rmtree(_prior(folder), ignore_errors=True)


def discard_latest(folder: Path) -> int | None:
    """The newest checkpoint led straight to a non-finite loss: drop it, restore the prior one; its step."""
    found = latest(folder)  # the prior itself, when a crash left no newer one: then none is good
    if found is not None:
        shutil.rmtree(found)
    if _prior(folder).exists():
        os.replace(_prior(folder), folder)
    saved = progress(folder)
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
