"""JSONL files, read strictly: every line a JSON object the caller's check accepts, errors as `file:line`.

Torch-free: the runtime reads `classify --input` files with it, training reads its data with it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from qlora_rt.errors import QloraError


def read_jsonl(path: str | Path, flag: str, check: Callable[[object, str], None],
               odd_fields: Callable[[dict], list[str]] | None = None, lines: list[int] | None = None) -> list[dict]:
    """Parse and validate every line; errors name file:line and what was expected.
    check(row, where): the caller's validation, raising QloraError; odd_fields(row): fields it ignores, counted
    into one warning; lines: when given, the line number of each row is appended to it."""
    p = Path(path)
    if p.is_dir():
        raise QloraError(f"{flag}: {p} is a folder; expected a JSONL file (one example a line)")
    if not p.is_file():
        raise QloraError(f"{flag}: {p} does not exist")
    rows, odd = [], Counter()
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{p}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise QloraError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                near = line[max(e.pos - 12, 0): e.pos + 12].strip()
                raise QloraError(f"{where}: not valid JSON ({e.msg} at column {e.colno}, near {near!r})") from None
            check(row, where)
            if odd_fields:
                odd.update(odd_fields(row))
            rows.append(row)
            if lines is not None:
                lines.append(n)
    if not rows:
        raise QloraError(f"{p}: no examples (the file is empty)")
    if odd:
        listed = ", ".join(f"{what} on {k} line{'s' if k > 1 else ''}" for what, k in sorted(odd.items()))
        print(f"{p}: warning: ignored {listed}", file=sys.stderr)
    return rows
