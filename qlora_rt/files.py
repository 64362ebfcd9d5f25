"""Writing folders so that a crash or a full disk never destroys what was saved before.

A folder is written under a temporary name beside its destination and renamed into place only when
every file in it is complete. The previous version is moved aside first and deleted last; if a crash
falls between the two renames, `resolve` finds the previous version under its aside name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qlora_rt.errors import QloraError


def _aside(final: Path) -> Path:
    return final.with_name(final.name + ".previous")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `final`, on any error it is removed."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise QloraError(f"{final} already exists; choose another --out or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as h:
                    os.fsync(h.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QloraError(f"could not write {final}: {e.strerror or e}; the previous version is untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = _aside(final)
    if final.exists():  # only then is an older aside copy redundant
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def resolve(final: str | Path) -> Path | None:
    """The folder as last completely written, or None when there is none."""
    final = Path(final)
    if final.exists():
        return final
    aside = _aside(final)
    return aside if aside.exists() else None


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
