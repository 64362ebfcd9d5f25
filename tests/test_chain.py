"""The main job, shortened, on the real bundled model: int4 QLoRA on the GGUF's own Q4_1 weights ->
adapter-aware and merged int4 exports -> the torch-free runtime answers held-out prompts."""

import json

import pytest

from qlora_rt.config import ExportConfig, TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.train.answers import prompt_messages
from qlora_rt.train.run import train
from qlora_rt.train.text_data import read_examples
from qlora_rt.trained import open_trained

pytestmark = pytest.mark.slow
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data"


def test_int4_run_exports_exactly_and_answers_offline(tmp_path):
    from qlora_rt.export.exporter import export
    from qlora_rt.runtime import Model

    result = train(TrainConfig(model="smollm2-135m", data=str(DATA / "dates-train.jsonl"), out=str(tmp_path / "run"),
                               quant="int4", gguf="file", quant_head=False, steps=6, batch_size=4,
                               seq_len=256, lr=1e-3, eval_every=0, checkpoint_every=0))
    files = sorted(p.name for p in result.adapter.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # PEFT's layout
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16

    trained = open_trained("smollm2-135m", result.adapter)
    assert all(layer.weight.int4.source == "gguf-q4_1" for layer in trained[0].model.modules()
               if hasattr(layer, "lora_A"))  # trained on the file's own weights
    reports = {}
    for mode in ("adapter-aware", "merged"):
        reports[mode] = export(ExportConfig(model="smollm2-135m", adapter=str(result.adapter), out=str(tmp_path / mode),
                                            mode=mode, weights="int4", int4_compute="fp32"), trained)
    aware = reports["adapter-aware"]
    assert "int4_relative_weight_error_mean" not in aware  # the trained bytes, not requantized
    assert aware["max_abs_logit_diff"] <= aware["tolerance"]
    assert aware["greedy_identical_prompts"] == aware["prompts"] == 4  # 3 chat prompts and a one-token one
    assert reports["merged"]["int4_relative_weight_error_mean"] < 0.15  # a merged weight is requantized: reported
    merged = reports["merged"]  # ... and held to the next-token distributions, with the default limits
    assert merged["mean_kl"] <= merged["max_kl"] and merged["top1_agreement"] >= merged["min_top1"]
    _corrupted_scale_fails(result.adapter, trained, tmp_path)

    rows = read_examples(DATA / "dates-heldout.jsonl")[:4]
    for mode, adapter in (("adapter-aware", "default"), ("merged", None)):
        answers = Model(tmp_path / mode).generate([prompt_messages(r) for r in rows], adapter=adapter,
                                                  max_new_tokens=12)
        assert all(a.tokens for a in answers) and all(a.prompt_tokens > 20 for a in answers)


def _corrupted_scale_fails(adapter, trained, tmp_path):
    """The requantized output head with its int4 scales doubled: a broken graph the default limits must
    catch. (Doubling layer 0's q_proj alone moves SmolLM2's next-token distributions too little for them.)"""
    import qlora_rt.export.int4_weights as ei
    from qlora_rt.errors import QloraError
    from qlora_rt.export.exporter import export

    real, calls = ei.requantize, []

    def corrupted(w, block, H=None):
        inputs, s, err = real(w, block, H)
        head = w.shape[0] == trained[0].model.config.vocab_size
        calls.append(head)
        return ({**inputs, "scales": inputs["scales"] * 2} if head else inputs), s, err

    ei.requantize = corrupted
    try:
        with pytest.raises(QloraError, match="export check failed: next-token distributions"):
            export(ExportConfig(model="smollm2-135m", adapter=str(adapter), out=str(tmp_path / "broken"),
                                mode="merged", weights="int4"), trained)
    finally:
        ei.requantize = real
    assert calls.count(True) == 1 and not (tmp_path / "broken").exists()


def test_the_fast_exact_path_is_plain_matmulnbits_and_exact(tmp_path):
    """--gguf int4 --quant-head on the real model: every product of the adapter-aware graph, the head
    included, is one plain MatMulNBits over the trained bytes (no Q4_1 correction, no fp32 head), and the
    export still equals PyTorch within 1e-3."""
    import onnx

    from qlora_rt.export.exporter import export

    result = train(TrainConfig(model="smollm2-135m", data=str(DATA / "dates-train.jsonl"), out=str(tmp_path / "run"),
                               quant="int4", gguf="int4", quant_head=True, steps=2, batch_size=2, seq_len=128,
                               lr=1e-3, eval_every=0, checkpoint_every=0))
    trained = open_trained("smollm2-135m", result.adapter)
    sources = {layer.weight.int4.source for layer in trained[0].model.modules() if hasattr(layer, "lora_A")}
    assert sources == {"gguf-q4_1-rounded"}
    report = export(ExportConfig(model="smollm2-135m", adapter=str(result.adapter), out=str(tmp_path / "aware"),
                                 weights="int4", int4_compute="fp32"), trained)
    assert report["tolerance"] == 1e-3 and report["max_abs_logit_diff"] <= 1e-3 and "as trained" in report["head"]
    nodes = onnx.load(str(tmp_path / "aware" / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulNBits") == 30 * 4 + 1  # q/k/v, o, gate/up, down; head
    assert not any(i.endswith(".correction") for n in nodes for i in n.input)  # no Q4_1 block-sum correction
    assert all(a.i == 0 for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")
    # the default (--int4-compute auto): the same bytes with int8 activations (the fast CPU path),
    # approximate, judged by distributions against the trained model as trained (fp32 activations)
    fast = export(ExportConfig(model="smollm2-135m", adapter=str(result.adapter), out=str(tmp_path / "int8")), trained)
    nodes = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False).graph.node
    levels = [a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert len(levels) == 30 * 4 + 1 and set(levels) == {4}
    assert fast["tolerance"] is None and fast["mean_kl"] <= 0.02 and fast["top1_agreement"] >= 0.9, fast
    assert fast["int4_activations"] == "int8" and "int8_check_failed" not in fast
    activations = [json.loads((tmp_path / d / "qlora_rt_export.json").read_text())["int4_activations"]
                   for d in ("aware", "int8")]
    assert activations == ["fp32", "int8"]  # what `serve` reads to say how to batch faster
    # int8 products that fail the check: `auto` writes the exact fp32 ones instead and says why; asked for
    # by name, they fail the export with what to do
    strict = dict(model="smollm2-135m", adapter=str(result.adapter), max_kl=1e-9, min_top1=1.0)
    safe = export(ExportConfig(out=str(tmp_path / "fallback"), **strict), trained)
    assert safe["int4_activations"] == "fp32" and safe["max_abs_logit_diff"] <= 1e-3, safe
    assert "mean KL" in safe["int8_check_failed"]
    with pytest.raises(QloraError, match="int8 activations moved the model's distributions; --int4-compute fp32"):
        export(ExportConfig(out=str(tmp_path / "strict"), int4_compute="int8", **strict), trained)
    assert not (tmp_path / "strict").exists()
