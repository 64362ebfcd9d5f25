"""Every runtime verb runs where torch is not installed: `generate`, `chat`, `classify --text`,
`classify --input/--output` and `serve`, on a decoder and an encoder export.

Two ways: in this interpreter with torch (and the other training packages) made unimportable, which is
fast; and, marked slow, in a fresh venv made from `pip install .[runtime,serve]`, as a user installs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_jsonl

from qlora_rt.runtime.manifest import MIN_ONNXRUNTIME

REPO = Path(__file__).resolve().parents[1]
TEXTS = [{"text": "good great lovely"}, {"text": "awful terrible poor"}]


def _verbs(decoder: Path, encoder: Path, work: Path) -> list[tuple[list[str], str | None]]:
    """(argv, standard input) for each runtime verb."""
    texts = write_jsonl(work / "texts.jsonl", TEXTS)
    return [
        (["generate", str(decoder), "--prompt", "hello", "--chat", "--adapter", "a", "--max-new-tokens", "4"], None),
        (["chat", str(decoder), "--max-new-tokens", "4"], "hello\n/adapter b\nhi again\n/exit\n"),
        (["classify", str(encoder), "--text", "good great", "--text", "awful poor"], None),
        (["classify", str(encoder), "--input", str(texts), "--output", str(work / "labels.jsonl")], None),
        (["classify", str(encoder), "--input", str(texts)], None),
        # the site's page and runtime are package data: an installed package writes them too
        (["web", str(decoder), "--out", str(work / "site"), "--node-modules", str(REPO / "qlora_rt" / "web" /
                                                                                 "node_modules")], None),
    ]


def _check_outputs(work: Path) -> None:
    assert all((work / "site" / name).is_file() for name in ("index.html", "qlora-rt.mjs", "model/model.onnx"))
    lines = [json.loads(line) for line in (work / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == len(TEXTS) and all(set(p["probs"]) == {"negative", "positive"} for p in lines)
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in lines)


def _check_serve(command: list[str], folder: Path, work: Path, env: dict | None = None) -> None:
    """`serve` starts, answers a completion, and stops on SIGTERM (uvicorn shuts down gracefully, then
    re-raises the signal, so the exit status is the signal's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*command, "serve", str(folder), "--port", str(port), "--served-model-name", "base"],
                            stderr=subprocess.PIPE, text=True, cwd=work, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        # greedy, past the end of text: an unseeded sampled reply (OpenAI's default temperature, 1) of the tiny
        # random model may end at its first token, with nothing to count
        body = json.dumps({"model": "a", "prompt": "hello", "max_tokens": 3, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert reply["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "this machine only" in err and "Traceback" not in err, err[-2000:]


BLOCKED = textwrap.dedent("""
    import sys

    class Block:  # any import of these fails, as in an environment that does not have them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "bitsandbytes", "safetensors", "onnx", "peft"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Block())
    from qlora_rt.cli import main
    code = main(sys.argv[1:])
    assert not {"torch", "transformers", "onnx", "safetensors"} & set(sys.modules), sorted(sys.modules)
    sys.exit(code)
""")


def test_every_runtime_verb_runs_with_torch_unimportable(tiny_export, encoder_export, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv, stdin in _verbs(tiny_export, encoder_export, tmp_path):
        proc = subprocess.run([sys.executable, "-c", BLOCKED, *argv], input=stdin, capture_output=True, text=True,
                              cwd=tmp_path, env=env)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    _check_outputs(tmp_path)
    _check_serve([sys.executable, "-c", BLOCKED], tiny_export, tmp_path, env)
    # a training verb says which extra to install, in one line
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "train", "--model", "m", "--data", "d", "--out", "o"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "pip install 'qlora-rt[export]'" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_every_runtime_verb_runs_in_a_venv_without_torch(tiny_export, encoder_export, tmp_path):
    """`pip install qlora-rt[runtime,serve]` into a fresh venv pulls no torch, and every runtime verb runs there,
    on the oldest onnxruntime the exports name (MIN_ONNXRUNTIME), with the same tokens as this interpreter's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"{REPO}[runtime,serve]", f"onnxruntime=={MIN_ONNXRUNTIME}"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'), "
                            "u.find_spec('export'), u.find_spec('qlora_rt.export') is not None)"],
                           capture_output=True, text=True, cwd=tmp_path)
    # no torch pulled in; the exporters install inside qlora_rt, not as a top-level `export` package
    assert probe.stdout.split() == ["None", "None", "True"], probe.stdout + probe.stderr
    for argv, stdin in _verbs(tiny_export, encoder_export, tmp_path):
        run = subprocess.run([str(venv / "bin" / "qlora-rt"), *argv], input=stdin, capture_output=True, text=True,
                             cwd=tmp_path)
        assert run.returncode == 0, (argv, run.stderr[-2000:])
    _check_outputs(tmp_path)
    _check_serve([str(venv / "bin" / "qlora-rt")], tiny_export, tmp_path)
    version = subprocess.run([str(py), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert version == MIN_ONNXRUNTIME
    argv = ["generate", str(tiny_export), "--prompt", "the capital of", "--adapter", "a", "--max-new-tokens", "12"]
    oldest = subprocess.run([str(venv / "bin" / "qlora-rt"), *argv], capture_output=True, text=True, cwd=tmp_path)
    here = subprocess.run([sys.executable, "-m", "qlora_rt", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert oldest.stdout == here.stdout and here.stdout.strip(), (oldest.stdout, here.stdout, oldest.stderr[-1000:])
