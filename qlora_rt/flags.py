"""The flag framework: a verb's settings are a dataclass whose fields are its flags.

`option(default, help, at_least=..., choices=..., path=True)` declares one; `add_flags` puts a dataclass's
fields on an argparse parser (`grad_accum` is `--grad-accum`, a bool is `--x/--no-x`); `build` makes the
settings from defaults < `--config FILE` < the flags given, and checks them (`check`), so every verb is
checked alike from the command line and from Python (where `check` is the settings' own method). Nothing
here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import operator
import os
import re
import types
import typing
from dataclasses import field, fields
from pathlib import Path

from qlora_rt.errors import QloraError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain file name: no folder, no '..', no hidden file

BOUNDS = {"at_least": ("at least", operator.ge), "above": ("above", operator.gt),
          "at_most": ("at most", operator.le), "below": ("below", operator.lt)}


def option(default, help: str, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None, **kw):
    """A flag; numeric bounds (inclusive at_least/at_most, exclusive above/below) are checked by `check_values`."""
    given = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    bounds = {k: v for k, v in given.items() if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds, **kw})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(cfg) -> None:
    """Every flag among its choices and every numeric one in its range (and finite), in one line naming the
    flag: before any model loads, for the Python API as for the command line."""
    for f in fields(cfg):
        value, bounds = getattr(cfg, f.name), f.metadata.get("bounds") or {}
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise QloraError(f"{flag(f.name)}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not (math.isfinite(value) and all(BOUNDS[k][1](value, b) for k, b in bounds.items())):
            rule = " and ".join(f"{BOUNDS[k][0]} {b:g}" for k, b in bounds.items()) or "a finite number"
            raise QloraError(f"{flag(f.name)} must be {rule}, got {value}")


def _path_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("path")]


def portable_paths(cls, values: dict, base: Path) -> dict:
    """values to save in a YAML file in folder `base`: every existing path relative to `base`, so that the
    file works from any directory (`resolve_paths` reads it back). A name that is no path stays as it is."""
    out = dict(values)
    for name in _path_fields(cls):
        v = out.get(name)
        if v and Path(v).exists():
            out[name] = os.path.relpath(Path(v).resolve(), base.resolve())
    return out


def resolve_paths(cls, values: dict, base: Path) -> dict:
    """values read from a YAML file in folder `base`: relative paths are relative to that file. (A relative
    path that is not there but exists from the working directory, as older run.yaml files wrote it, is kept.)"""
    out = dict(values)
    for name in _path_fields(cls):
        v = out.get(name)
        if isinstance(v, str) and v and not Path(v).is_absolute() and (base / v).exists():
            out[name] = os.path.normpath(base / v)
    return out


def typed_values(cls, values: dict, where: str) -> dict:
    """Settings read from a file, each checked against its field's type: one line for a wrong one. A single
    string where a list is taken (`prompt: hi`) is a list of one; an integer where a float is, a float."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        kind = hints[name]
        options = [a for a in typing.get_args(kind) if a is not type(None)] if isinstance(kind, types.UnionType) \
            else [kind]
        if value is None and type(None) in typing.get_args(kind):
            out[name] = value
            continue
        base = options[0]
        if typing.get_origin(base) is list:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a string or a list of strings"
        elif base is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif base is int:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif base is float:
            if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
                with contextlib.suppress(ValueError):
                    value = float(value)
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            raise QloraError(f"{where}: {name} must be {want}, got {value!r:.60}")
        out[name] = value
    return out


def require(cfg, *names: str) -> None:
    """Every named flag must be given (non-empty)."""
    for name in names:
        if not getattr(cfg, name):
            raise QloraError(f"{flag(name)} is required")


def check_name(name: str, what: str = "--name") -> None:
    """Names become file names inside the export folder: nothing that reaches outside it."""
    if not NAME.fullmatch(name) or name.endswith("."):
        raise QloraError(f"{what}: {name!r} is not a plain name (letters, digits, '.', '_', '-'; no folders, no "
                         "leading dot, at most 128 characters)")


def _flag_type(annotation) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if isinstance(annotation, types.UnionType) and args else annotation


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = _flag_type(hints[f.name])
        shown = "" if f.default in ("", None) else f" (default: {f.default})"
        # argparse formats help texts with %: a literal one (say "75%") must reach it doubled
        text = (f.metadata.get("help", "") + shown).replace("%", "%%")
        kw = {"default": argparse.SUPPRESS, "help": text}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), nargs="?", **kw)
            continue
        kw["dest"] = f.name
        if typing.get_origin(kind) is list:
            kw.update(action="append", type=typing.get_args(kind)[0], metavar=f.name.upper())
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["metavar"] = f.name.upper() if "choices" not in f.metadata else None
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def build(cls: type, args: argparse.Namespace):
    """The settings: defaults < --config YAML < flags given, checked (its `check`) before they are returned."""
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise QloraError(f"--config: {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise QloraError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise QloraError(f"--config: {path} is not a YAML mapping of settings (field: value)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QloraError(f"--config: {path}: unknown field(s) {', '.join(unknown)}")
        values = resolve_paths(cls, typed_values(cls, values, f"--config {path}"), path.parent)
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    cfg = cls(**values)
    cfg.check()
    return cfg
