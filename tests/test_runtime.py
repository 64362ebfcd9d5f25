"""The torch-free runtime on a tiny export: same tokens as PyTorch, seeded sampling, adapters per call, errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qlora_rt.cli import main
from qlora_rt.config import ChatConfig
from qlora_rt.errors import QloraError

PROMPTS = ["what is the capital of france?", "count to five", "hello"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def runtime(exported):
    from qlora_rt.runtime import Model

    return Model(exported)


def _torch_greedy(tiny_llama, adapter, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    from qlora_rt.adapters import open_trained

    loaded, _, _ = open_trained(str(tiny_llama), str(adapter) if adapter else None)
    x = torch.tensor([prompt_ids])
    eos = loaded.tokenizer.eos_token_id
    with torch.no_grad():
        seq = loaded.model.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                           eos_token_id=eos, pad_token_id=eos)[0, x.shape[1]:].tolist()
    return seq[: seq.index(eos)] if eos in seq else seq


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_greedy_equals_pytorch_and_batching_changes_nothing(tiny_llama, tiny_runs, runtime, adapter):
    _, adapters = tiny_runs
    singles = [runtime.generate(p, chat=True, adapter=adapter, max_new_tokens=16) for p in PROMPTS]
    for prompt, got in zip(PROMPTS, singles):
        ids = runtime.encode(prompt, chat=True)
        assert got.prompt_tokens == len(ids)
        assert got.tokens == _torch_greedy(tiny_llama, adapters[adapter] if adapter else None, ids, 16), prompt
    assert sum(len(c.tokens) for c in singles) >= 12  # real continuations, not an immediate end
    batch = runtime.generate(PROMPTS, chat=True, adapter=adapter, max_new_tokens=16)  # left-padded, one run
    assert [c.tokens for c in batch] == [c.tokens for c in singles]


def test_adapters_switch_per_call_without_reloading(runtime):
    session = runtime.session
    out = {name: runtime.generate(PROMPTS[0], chat=True, adapter=name, max_new_tokens=12).tokens
           for name in (None, "a", "b", None, "a")}
    assert runtime.session is session and len(runtime._adapters) == 2
    assert len({tuple(v) for v in out.values()}) == 3  # each adapter its own output; the base in between
    assert runtime.adapter_names == ["a", "b"]


def test_sampling_is_reproducible_with_a_seed(runtime):
    def sample(seed, **kw):
        return runtime.generate(PROMPTS[1], chat=True, max_new_tokens=12, temperature=1.5, seed=seed, **kw).tokens

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(4)}) > 1
    greedy = runtime.generate(PROMPTS[1], chat=True, max_new_tokens=12).tokens
    assert sample(3, top_k=1) == greedy and sample(5, top_p=1e-6) == greedy


def test_stream_yields_the_same_text_and_stop_strings_cut_it(runtime):
    full = runtime.generate(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a")
    stream = runtime.stream(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a")
    assert "".join(stream) == full.text and stream.result.tokens == full.tokens
    assert len(full.text) > 6, full.text
    stop = full.text[4:6]
    cut = runtime.generate(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a", stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    stream = runtime.stream(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a", stop=[stop])
    assert "".join(stream) == cut.text


def test_runtime_errors(exported, runtime, tmp_path, tiny_runs):
    from qlora_rt.runtime import Model

    with pytest.raises(QloraError, match="has no model.onnx"):
        Model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    meta = json.loads((bad / "qlora_rt_export.json").read_text())
    (bad / "qlora_rt_export.json").write_text(json.dumps({**meta, "layers": 3}))
    with pytest.raises(QloraError, match="does not match qlora_rt_export.json"):
        Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "lora_inputs"}))
    with pytest.raises(QloraError, match="missing lora_inputs"):
        Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "kv_cache"}))
    with pytest.raises(QloraError, match="exported by an older qlora-rt .*export it again"):
        Model(bad)  # its graph concatenates the cache: the in-place binding would read stale rows
    (bad / "qlora_rt_export.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 16}))
    with pytest.raises(QloraError, match="made for another base model"):  # same shapes, another base
        Model(bad).generate("hello", adapter="a")
    with pytest.raises(QloraError, match="no adapter named 'c'.*available: a, b"):
        runtime.generate("hello", adapter="c")
    with pytest.raises(QloraError, match="--prompt is empty"):
        runtime.generate("  ")
    with pytest.raises(QloraError, match="context is 256 tokens"):
        runtime.generate("hello " * 300)
    with pytest.raises(QloraError, match="--temperature must be >= 0"):
        runtime.generate("hello", temperature=-1)


def test_adapter_of_another_model_is_refused(tmp_path, tiny_runs, exported):
    """An adapter file exported for a model with other dimensions: the shapes do not fit."""
    from export.adapters import write_adapter
    from qlora_rt.runtime import Model

    meta = json.loads((exported / "qlora_rt_export.json").read_text())
    arrays = {"model.layers.0.self_attn.o_proj.lora_A": np.zeros((128, 4), np.float32),
              "model.layers.0.self_attn.o_proj.lora_B": np.zeros((4, 64), np.float32)}
    path = write_adapter(arrays, tmp_path / "other.onnx_adapter", meta)
    with pytest.raises(QloraError, match=r"has shape \[128, 4\], this export expects \[64, None\]"):
        Model(exported).generate("hello", adapter=str(path))


def test_cli_generate_and_chat(exported, runtime, capsys):
    assert main(["generate", str(exported), "--prompt", PROMPTS[0], "--chat", "--adapter", "b",
                 "--max-new-tokens", "8", "--verbose"]) == 0
    out, err = capsys.readouterr()
    want = runtime.generate(PROMPTS[0], chat=True, adapter="b", max_new_tokens=8)
    assert out == want.text + "\n" and "time to first token" in err and "tokens/s" in err
    assert main(["generate", str(exported), "--adapter", "nope", "--prompt", "x"]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err

    from qlora_rt.console import chat

    lines = iter(["count to five", "/adapter a", "hello", "/adapter zzz", "/exit"])
    messages = chat(ChatConfig(folder=str(exported), max_new_tokens=6), read=lambda _: next(lines))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == runtime.generate(messages[:3], adapter="a", max_new_tokens=6).text
    assert "no adapter named 'zzz'" in capsys.readouterr().err


TORCH_FREE = textwrap.dedent("""
    import sys

    class Block:  # any import of these fails, as in an environment that does not have them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "bitsandbytes", "onnx", "peft"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Block())
    from qlora_rt.cli import main
    code = main(["generate", sys.argv[1], "--prompt", "hello", "--chat", "--adapter", "a", "--max-new-tokens", "4"])
    assert code == 0, code
    assert not {"torch", "transformers", "onnx"} & set(sys.modules), sorted(sys.modules)
    assert main(["train", "--model", "m", "--data", "d", "--out", "o"]) == 2  # says which extra to install
""")


def test_runtime_runs_without_torch(exported, capfd):
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(exported)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'qlora-rt[export]'" in proc.stderr


@pytest.mark.slow
def test_runtime_installs_and_runs_in_a_venv_without_torch(exported, tmp_path):
    """`pip install qlora-rt` (the base install) into a fresh venv pulls no torch and runs an export."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "None", "the runtime install pulled torch"
    run = subprocess.run([str(venv / "bin" / "qlora-rt"), "generate", str(exported), "--prompt", "hello", "--chat",
                          "--adapter", "a", "--max-new-tokens", "4", "--verbose"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0 and "tokens/s" in run.stderr, run.stderr
