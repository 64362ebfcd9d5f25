"""Stage 3, training: data, tasks, the step loop, checkpoints and run folders, several processes.

`from qlora_rt.train import train, TrainResult` is the Python entry point (the `train` verb).
"""

from __future__ import annotations


def __getattr__(name: str):
    # lazy, so that importing one training module (say text_data) does not import the whole loop
    if name in ("train", "preflight", "TrainResult"):
        from qlora_rt.train import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
