"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    runs/X/checkpoint/adapter_model.safetensors   A and B, under PEFT's key names as in adapter/
    runs/X/checkpoint/trainer_state.pt            optimizer, scheduler, RNG states, data position, step

The state file holds tensors and plain Python values only and is read with `weights_only=True`:
nothing is unpickled. The folder is replaced atomically, so an interrupted save leaves the previous
checkpoint in place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora_rt.adapters import PREFIX, adapter_tensors
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, resolve
from qlora_rt.lora import lora_layers

ADAPTER, STATE = "adapter_model.safetensors", "trainer_state.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, model: torch.nn.Module, optimizer, scheduler, progress: dict) -> None:
    tensors = adapter_tensors(model)  # the same tensors and PEFT key names as the final adapter
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "progress": progress}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / ADAPTER))
        torch.save(state, tmp / STATE)


def load(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and RNG; return the saved progress dict."""
    found = resolve(folder)
    if found is None or not (found / STATE).exists():
        raise QloraError(f"--resume: no checkpoint in {folder}; start the run without --resume")
    try:
        tensors = load_file(str(found / ADAPTER))
        state = torch.load(found / STATE, weights_only=True, map_location="cpu")
    except Exception as e:
        raise QloraError(f"{found}: checkpoint is unreadable ({str(e).splitlines()[0]})") from None
    layers = lora_layers(model)
    if set(tensors) != set(adapter_tensors(model)):
        raise QloraError(f"{found}: checkpoint adapter does not match this run's targets/rank; "
                         "was the run's config changed?")
    with torch.no_grad():
        for key, t in tensors.items():
            owner, ab = key.removeprefix(PREFIX).rsplit(".lora_", 1)
            target = getattr(layers[owner], f"lora_{ab[0]}").weight
            if target.shape != t.shape:
                raise QloraError(f"{found}: {key} has shape {tuple(t.shape)}, this run expects {tuple(target.shape)}")
            target.copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["progress"]
