"""A training run's folder (`--out`): what it holds, whether a run there starts, continues or is refused, and
its records (run.yaml, metrics.jsonl). The step loop writes through it; it knows nothing of models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import yaml

from qlora_rt.config import LEGACY, TrainConfig, flag, portable_paths, upgraded
from qlora_rt.errors import QloraError
from qlora_rt.files import write_yaml
from qlora_rt.train import checkpoint

# Settings a resume may change: they steer the optimizer and the logging, not what the run has learnt so far
# (a lower --lr after a divergence is the usual one). The change is recorded in metrics.jsonl and run.yaml.
RESUMABLE = ("lr", "warmup", "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every", "log_every",
             "eval_data", "dist_timeout", "grad_checkpointing")
# How long the run is: a resume may extend it (the schedule is recomputed for the new length; the data order
# continues). Shorter than the checkpoint's step is refused once the length in steps is known (the trainer).
EXTENDABLE = ("steps", "epochs")
# Compared by what they hold, not by how they are spelled: the base by its fingerprint, the data by its digest.
BY_CONTENT = ("model", "data", "out")
# What a run folder holds, temporary names included: a run killed before run.yaml may leave some of them.
RUN_FILES = re.compile(r"\.?(run\.yaml|metrics\.jsonl|checkpoint|adapter|residual_base\.safetensors|lock)"
                       r"(\.tmp.*|\.previous|\.prior)?")
LOCK = ".lock"  # held (flock) by the process writing the folder; the kernel lets go when it ends, however


class RunFolder:
    def __init__(self, path: str | Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main  # one process writes the folder; the others only read it
        self.checkpoint = self.path / "checkpoint"
        self.metrics = self.path / "metrics.jsonl"
        self.settings = self.path / "run.yaml"
        self.adapter = self.path / "adapter"
        self._lock = None  # the open lock file while this process writes the folder

    def lock(self) -> None:
        """Take the folder for this process (where it exists): a second `train` on it, or a second --resume,
        fails at once with one line naming the process that has it. The lock goes with the process that holds
        it, however it ends, so a killed run never blocks the next."""
        if self._lock is not None or not self.path.is_dir():
            return
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise QloraError(f"--out: {self.path} is in use by another training run (process {holder}); wait for "
                             "it to end, or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file lets go of its lock
            self._lock = None

    def previous_settings(self) -> dict | None:
        """A run's saved settings, for --resume to keep its `auto` choices; None where there is no run."""
        if not self.path.is_dir():
            return None
        saved = checkpoint.progress(self.checkpoint)
        found = (saved or {}).get("config") or (read_settings(self.settings) if self.settings.is_file() else None)
        return None if found is None else upgraded(found)

    def open(self, cfg: TrainConfig) -> dict | None:
        """The checkpoint progress to resume from, or None to start at step 0.

        A folder whose run stopped before its first checkpoint holds nothing to keep: it starts again in place,
        with or without --resume, instead of being a dead end."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise QloraError(f"--out: {out} is a file; expected a run folder")
        saved = checkpoint.progress(self.checkpoint)
        started = self.settings.exists() or saved is not None
        if not started:
            if cfg.resume:
                raise QloraError(f"--resume: {self.settings} not found; there is no run to continue in {out}")
            foreign = sorted(p.name for p in out.iterdir() if not RUN_FILES.fullmatch(p.name)) if out.exists() else []
            if foreign:  # the run would write adapter/ and checkpoint/ among someone else's files
                raise QloraError(f"--out: {out} holds files that are not a run's ({', '.join(foreign[:3])}"
                                 f"{' …' if len(foreign) > 3 else ''}); choose a new or empty folder")
            return None
        if saved is None:
            if self.adapter.exists():
                why = ("holds a finished run with no checkpoint to continue from" if cfg.resume
                       else "already holds a run")
                raise QloraError(f"--out: {out} {why}; choose another folder")
            if self.main:
                print(f"{out}: the run there stopped before its first checkpoint; starting it again from step 0",
                      file=sys.stderr)
                self.metrics.unlink(missing_ok=True)  # the abandoned attempt's records
            return None
        if not cfg.resume:
            raise QloraError(f"--out: {out} already holds a run; pass --resume to continue it or choose another folder")
        before = upgraded(saved.get("config") or read_settings(self.settings))
        now = cfg.saved()
        # what a run saved before a setting existed had
        defaults = {**TrainConfig(model="-", data="-", out="-").saved(), **LEGACY}
        diff = [f"{k} ({before.get(k)!r} -> {v!r})" for k, v in now.items()
                if k not in RESUMABLE + EXTENDABLE + BY_CONTENT and before.get(k, defaults[k]) != v]
        if diff:
            raise QloraError(f"--resume: settings differ from the run's ({', '.join(diff)}); only "
                             f"{', '.join(flag(k) for k in RESUMABLE)} may change on resume, and --steps or --epochs "
                             "to extend it")
        saved["changed"] = {k: [before.get(k), now[k]] for k in RESUMABLE + EXTENDABLE if before.get(k) != now[k]}
        return saved

    @staticmethod
    def check_same_run(saved: dict, fingerprint: str, data: dict, examples: int, cfg: TrainConfig) -> None:
        """A resumed run's base and data are the ones its checkpoint was made with."""
        if saved.get("base") and saved["base"] != fingerprint:
            raise QloraError(f"--resume: --model {cfg.model} is not the base this run was trained on")
        was = saved.get("data")
        if was and (was["sha256"] != data["sha256"] or was.get("examples", examples) != examples):
            raise QloraError(f"--resume: --data {cfg.data} changed since the run started ({was['bytes']:,} -> "
                             f"{data['bytes']:,} bytes, {was.get('examples', '?')} -> {examples} examples): the "
                             "checkpoint's place in the data no longer means anything; restore the file or start a "
                             "new run")

    def write_settings(self, cfg: TrainConfig) -> None:
        write_yaml(self.settings, portable_paths(TrainConfig, cfg.saved(), self.path))

    def record(self, record: dict) -> None:
        """One line of metrics.jsonl (from the writing process only)."""
        if self.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_records_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget their first, abandoned records (and a
        last line cut short by a kill). Where the file is gone, says so: the steps before are not recorded again."""
        if self.main and step > 0 and not self.metrics.exists():
            print(f"--resume: {self.metrics} is gone: the records of steps 1-{step} are lost; the steps from "
                  f"{step + 1} on are recorded in a new one", file=sys.stderr)
        if self.main and self.metrics.exists():
            lines = []
            for line in self.metrics.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        lines.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            self.metrics.write_text("".join(l + "\n" for l in lines))


def read_settings(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise QloraError(f"--resume: {path} is unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise QloraError(f"--resume: {path} is empty or not a run's settings (a full disk?) and the checkpoint does "
                         "not record them; write the run's flags back into it (qlora-rt train --help)")
    return saved


def data_digest(path: str) -> dict:
    """What identifies the training data: a resumed run must read the very same examples in the same order."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()[:16]}
