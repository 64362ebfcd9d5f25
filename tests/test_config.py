"""Every flag is checked before any model loads: one line naming the flag and what it accepts."""

import argparse
from dataclasses import dataclass, fields

import pytest

from qlora_rt.cli import VERBS, main
from qlora_rt.config import option
from qlora_rt.flags import add_flags, build

TRAIN = ["train", "--model", "no-such-model", "--data", "no-such.jsonl", "--out", "never-written"]

BAD_FLAGS = [  # (verb args, the flag, what the message says)
    (TRAIN + ["--steps", "0"], "--steps must be at least 1, got 0"),
    (TRAIN + ["--steps", "-3"], "--steps must be at least 1, got -3"),
    (TRAIN + ["--epochs", "0"], "--epochs must be above 0, got 0.0"),
    (TRAIN + ["--warmup", "-5"], "--warmup must be at least 0, got -5.0"),
    (TRAIN + ["--dropout", "2"], "--dropout must be at least 0 and below 1, got 2.0"),
    (TRAIN + ["--lr", "-1"], "--lr must be above 0, got -1.0"),
    (TRAIN + ["--lr", "nan"], "--lr must be above 0, got nan"),
    (TRAIN + ["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (TRAIN + ["--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (TRAIN + ["--max-grad-norm", "inf"], "--max-grad-norm must be at least 0, got inf"),
    (TRAIN + ["--loftq-iters", "9"], "--loftq-iters must be at least 1 and at most 5, got 9"),
    (["generate", "no-such-folder", "--prompt", "x", "--threads", "-2"], "--threads must be at least 0, got -2"),
    (["generate", "no-such-folder", "--prompt", "x", "--temperature", "nan"],
     "--temperature must be at least 0, got nan"),
    (["generate", "no-such-folder", "--prompt", "x", "--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
    (["generate", "no-such-folder", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["export", "--model", "m", "--out", "o", "--tolerance", "-1"], "--tolerance must be at least 0, got -1.0"),
    (["export", "--model", "m", "--out", "o", "--name", "../../x"], "--name: '../../x' is not a plain name"),
    (["export-adapter", "--adapter", "a", "--onnx", "o", "--name", "/abs/path"],
     "--name: '/abs/path' is not a plain name"),
    (["export-adapter", "--adapter", "a", "--onnx", "o", "--name", ".hidden"], "--name: '.hidden' is not a plain name"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flag_is_one_line_naming_it(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qlora-rt {argv[0]}: error: {message}") and "\n" not in err, err
    assert not (tmp_path / "never-written").exists()


def test_python_api_checks_the_same_ranges():
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.errors import QloraError

    with pytest.raises(QloraError, match="--batch-size must be at least 1, got 0"):
        TrainConfig(model="m", data="d", out="o", batch_size=0).check()
    with pytest.raises(QloraError, match="--block-size: expected one of 16, 32, 64, 128, 256, got 7"):
        ExportConfig(model="m", out="o", block_size=7).check()


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_checks_its_settings_as_the_python_api_does(verb, monkeypatch):
    """The CLI builds every verb's settings through `build`, which runs the settings' own `check`: the one the
    Python API runs (train, export, generate, chat call it themselves)."""
    from qlora_rt.errors import QloraError

    cls = VERBS[verb][1]
    checked = []
    monkeypatch.setattr(cls, "check", lambda self: checked.append(self) or (_ for _ in ()).throw(QloraError("no")))
    with pytest.raises(QloraError, match="no"):
        build(cls, argparse.Namespace())
    assert len(checked) == 1 and isinstance(checked[0], cls)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_prints_its_help(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: qlora-rt {verb}") and "option_strings" not in text
    for f in fields(VERBS[verb][1]):  # every setting is a flag (or the positional FOLDER) and is explained
        shown = f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
        assert shown in text, shown


def test_a_percent_sign_in_a_help_text_is_printed_not_formatted():
    @dataclass
    class Settings:
        share: float = option(0.75, "keep 75% of the tokens")

    p = argparse.ArgumentParser(prog="x")
    add_flags(p, Settings)
    assert "keep 75% of the tokens (default: 0.75)" in " ".join(p.format_help().split())
