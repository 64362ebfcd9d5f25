"""The docs as a newcomer copies them: every `qlora-rt` command line in README.md and docs/ names a real verb,
real flags and accepted values, and every Python block parses. (The commands that run end to end, the
README's two, are CI itself and `make demo`.)"""

import re
import shlex
from pathlib import Path

import pytest

from qlora_rt.cli import parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"```([a-z]*)\n(.*?)```", re.S)


def _blocks(kind: str | None = None):
    for path in DOCS:
        for lang, body in FENCED.findall(path.read_text()):
            if kind is None or lang == kind:
                yield path, body


def _command_lines() -> list[tuple[str, str]]:
    lines = []
    for path, body in _blocks():
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("qlora-rt "):
                lines.append((path.name, line))
    return lines


COMMANDS = _command_lines()


def test_the_docs_have_command_lines_to_check():
    assert len(COMMANDS) >= 20 and {name for name, _ in COMMANDS} >= {"README.md", "training.md", "export.md"}


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{n}:{l[:60]}" for n, l in COMMANDS])
def test_every_documented_command_parses(where, line, capsys):
    line = re.sub(r"\[[^\]]*\]", " ", line)  # [--optional ...] is the doc's notation, not a flag
    # a quoted "..." stands for a value; a bare ... or "...same flags..." for more flags
    words = [w for w in shlex.split(line.replace('"..."', "x"), comments=True)[1:] if "..." not in w]
    try:
        parser().parse_args(words)
    except SystemExit as e:
        if e.code:  # --help exits 0
            pytest.fail(f"{where}: `{line}` does not parse: {capsys.readouterr().err.strip()[-300:]}")


PYTHON = [(path.name, body) for path, body in _blocks("python")]


@pytest.mark.parametrize("where,code", PYTHON, ids=[f"{n}:{i}" for i, (n, _) in enumerate(PYTHON)])
def test_every_python_block_parses(where, code):
    compile(code, where, "exec")
