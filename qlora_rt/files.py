"""Writing folders so that a crash or a full disk never destroys what was saved before.

A folder is written under a temporary name beside its destination and renamed into place only when
every file in it is complete. The previous version is moved aside first and deleted last; if a crash
falls between the two renames, `resolve` finds the previous version under its aside name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from qlora_rt.errors import QloraError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a `kill`, a closing terminal's or a container's stop) raises SystemExit here, as Ctrl-C raises
    KeyboardInterrupt, so a half-written folder is removed instead of left behind; outside the main
    thread, or where a handler is already set, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _aside(final: Path) -> Path:
    return final.with_name(final.name + ".previous")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True, keep: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `final`, on any error it is removed.
    keep: where the replaced version goes instead of being deleted (a checkpoint's fallback)."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise QloraError(f"{final} already exists; choose another --out or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would follow the folder to a device or a web server
    try:
        with _sigterm_unwinds():
            yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as h:
                    os.fsync(h.fileno())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous version is untouched" if final.exists() else "nothing was written"
        if disk_full(e):
            free = shutil.disk_usage(final.parent).free
            raise QloraError(f"could not write {final}: the disk is full ({free / 2**20:,.1f} MiB free on the "
                             f"device holding {final.parent}); {kept}") from None
        if isinstance(e, OSError):
            raise QloraError(f"could not write {final}: {e.strerror or e}; {kept}") from None
        raise
    aside = keep or _aside(final)
    if final.exists():  # only then is an older aside copy redundant
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    if keep is None:
        shutil.rmtree(aside, ignore_errors=True)


def check_out(out: str | Path, overwrite: bool, manifest: str, fmt: str, verb: str,
              reads: tuple = ()) -> None:
    """--out of a verb that writes a whole folder. --overwrite replaces only a folder that this tool wrote as
    that kind of output (its manifest names `fmt`), or an empty one: never a run, a model or a home folder."""
    out = Path(out)
    if not out.exists():
        return
    if not overwrite:
        raise QloraError(f"--out: {out} already exists; choose another folder or pass --overwrite")
    refuse = f"--overwrite: refusing to replace {out}"
    if not out.is_dir():
        raise QloraError(f"{refuse}: it is a file, not a folder written by `qlora-rt {verb}`")
    if not any(out.iterdir()):
        return
    try:
        mine = json.loads((out / manifest).read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        mine = False
    if not mine:
        raise QloraError(f"{refuse}: it was not written by `qlora-rt {verb}` (no {manifest} of format {fmt!r}); "
                         "choose another --out, or remove it yourself")
    for path in reads:
        if path and (Path(path).resolve() == out.resolve() or out.resolve() in Path(path).resolve().parents):
            raise QloraError(f"{refuse}: it holds {path}, which this command reads")


def disk_full(e: BaseException) -> bool:
    """A write that failed for lack of space, as Python, safetensors (Rust) and others report it."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded"))


def write_yaml(path: Path, obj: object) -> None:
    """A small file written under a temporary name and renamed: a crash or a full disk never leaves half of it."""
    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        what = "the disk is full" if disk_full(e) else (e.strerror or str(e))
        raise QloraError(f"could not write {path}: {what}") from None


def resolve(final: str | Path) -> Path | None:
    """The folder as last completely written, or None when there is none."""
    final = Path(final)
    if final.exists():
        return final
    aside = _aside(final)
    return aside if aside.exists() else None


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
