"""Encoder classifiers exported to ONNX and run by the torch-free runtime (`qlora-rt classify`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_encoder, sentiment_rows, write_jsonl

from qlora_rt.cli import main
from qlora_rt.config import ExportConfig, TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.export.exporter import export
from qlora_rt.runtime import Classifier
from qlora_rt.train.run import train
from qlora_rt.trained import open_trained

TEXTS = ["the movie was good", "awful", "a really terrible day and the food was poor", "fine service"]
PAIRS = ["the day", "a movie", "quite", "really the food"]


def run(base, data, out, **kw):
    cfg = dict(model=str(base), data=str(data), out=str(out), steps=6, lr=5e-3, batch_size=8, rank=4, seq_len=32,
               checkpoint_every=0, eval_every=0)
    return train(TrainConfig(**{**cfg, **kw})).adapter


def torch_logits(trained, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return trained.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """A base and a trained adapter per family: BERT on text pairs (token types), RoBERTa on int4 (positions
    from the padding index), DistilBERT on fp4, XLM-R on pairs (one token type: both texts are type 0),
    ModernBERT on int4 (rotary, local layers whose band the test texts pass, mean pooling)."""
    tmp = tmp_path_factory.mktemp("families")
    out = {}
    for kind, quant, pairs in (("bert", "nf4", True), ("roberta", "int4", False), ("distilbert", "fp4", False),
                               ("xlm-roberta", "nf4", True), ("modernbert", "int4", False)):
        base = save_encoder(tmp / f"{kind}-base", kind)
        data = write_jsonl(tmp / f"{kind}.jsonl", sentiment_rows(24, 0, pairs=pairs))
        out[kind] = (base, run(base, data, tmp / f"{kind}-run", quant=quant), pairs)
    return tmp, out


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "xlm-roberta", "modernbert"])
@pytest.mark.parametrize("mode,weights", [("merged", "fp32"), ("adapter-aware", "fp32"), ("adapter-aware", "nf4"),
                                          ("adapter-aware", "int4"), ("merged", "fp16"), ("merged", "int4")])
def test_export_matches_pytorch_through_the_runtime(families, kind, mode, weights):
    """Exact formats within 1e-3 of PyTorch (fp16 rounding within 5e-2 here) on padded batches, through
    the runtime users run; requantized int4 is judged by its labels. Each file the export writes, the runtime
    reads alone."""
    tmp, runs = families
    base, adapter, pairs = runs[kind]
    trained_as = {"bert": "nf4", "roberta": "int4", "distilbert": "fp4", "xlm-roberta": "nf4",
                  "modernbert": "int4"}[kind]
    if weights == "nf4" and trained_as not in ("nf4", "fp4"):
        pytest.skip("MatMulBnb4 holds NF4/FP4 bases")
    out = tmp / f"onnx-{kind}-{mode}-{weights}"
    report = export(ExportConfig(model=str(base), adapter=str(adapter), out=str(out), mode=mode, weights=weights))
    exact = weights != "int4" or (mode == "adapter-aware" and trained_as == "int4")
    assert report["max_abs_logit_diff"] <= ({"fp16": 5e-2}.get(weights, 1e-3) if exact else 10)
    if exact and weights != "fp16":
        assert report["tolerance"] > 0
    else:  # approximate: judged by the labels' distributions (fp16 to far stricter limits than requantized int4)
        assert report["tolerance"] is None and report["max_kl"] == (1e-3 if weights == "fp16" else 0.2)
    clf = Classifier(out)
    feeds = clf.encode(TEXTS, PAIRS if pairs else None)
    assert ("token_type_ids" in feeds) == (kind == "bert") and feeds["attention_mask"].min() == 0  # padded
    trained = open_trained(base, adapter)[0]
    got, ref = clf.logits(feeds, "default" if mode == "adapter-aware" else None), torch_logits(trained, feeds)
    assert np.abs(got - ref).max() <= (report["max_abs_logit_diff"] * 10 + 1e-4 if exact else 10)
    preds = clf.classify(TEXTS, PAIRS if pairs else None)
    assert [p.label for p in preds] == [["negative", "positive"][i] for i in got.argmax(-1)]
    assert all(abs(sum(p.probs.values()) - 1) < 1e-6 for p in preds)


def test_one_base_serves_tasks_with_their_own_heads_and_labels(tmp_path):
    """Two adapters, 2 and 3 labels, on one adapter-aware base export: each brings its LoRA, head and label
    names; each equals its own PyTorch model; a plain onnxruntime session gets the names as an output."""
    import onnxruntime as ort

    base = save_encoder(tmp_path / "base", "bert")
    two = run(base, write_jsonl(tmp_path / "two.jsonl", sentiment_rows(24, 0)), tmp_path / "two")
    three_rows = sentiment_rows(24, 1, labels=("negative", "neutral", "positive"))
    three = run(base, write_jsonl(tmp_path / "three.jsonl", three_rows), tmp_path / "three", seed=1)
    out = tmp_path / "onnx"
    export(ExportConfig(model=str(base), out=str(out)))  # the bare base: no head of its own
    for name, adapter in (("sentiment", two), ("tone", three)):
        assert main(["export-adapter", "--adapter", str(adapter), "--onnx", str(out), "--name", name]) == 0
    clf = Classifier(out)
    with pytest.raises(QloraError, match="pass --adapter NAME \\(available: sentiment, tone\\)"):
        clf.classify("good")
    feeds = clf.encode(TEXTS)
    for name, adapter, labels in (("sentiment", two, ["negative", "positive"]),
                                  ("tone", three, ["negative", "neutral", "positive"])):
        assert clf.labels(name) == labels
        got = clf.logits(feeds, name)
        assert got.shape == (4, len(labels))
        assert np.abs(got - torch_logits(open_trained(base, adapter)[0], feeds)).max() < 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(out / "adapters" / "tone.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    logits, names = session.run(["logits", "label_names"], feeds, options)
    assert json.loads(bytes(names).decode()) == ["negative", "neutral", "positive"] and logits.shape == (4, 3)


def test_classify_cli(families, tmp_path, capsys):
    tmp, runs = families
    base, adapter, _ = runs["distilbert"]
    out = tmp_path / "onnx"
    export(ExportConfig(model=str(base), adapter=str(adapter), out=str(out), mode="merged"))
    capsys.readouterr()
    assert main(["classify", str(out), "--text", "the movie was good", "--text", "awful"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("negative", "positive")
    assert 0.5 <= float(lines[0].split("\t")[1]) <= 1
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS] + [{"text": " ".join(["good"] * 200)}])
    assert main(["classify", str(out), "--input", str(inp), "--output", str(tmp_path / "preds.jsonl")]) == 0
    preds = [json.loads(l) for l in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and set(preds[0]["probs"]) == {"negative", "positive"}
    assert "1 of 5 inputs are longer than 64 tokens and were truncated" in capsys.readouterr().err
    for argv, message in [
        (["--text", " "], "text 1 is empty"),
        (["--input", str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "x"}]))],
         "bad.jsonl:2: expected an object with a non-empty 'text'"),
        (["--text", "ok", "--adapter", "x"], "is a merged export"),
        (["--input", str(inp), "--output", str(inp)], "is the --input file"),
        (["--input", str(inp), "--output", str(tmp_path)], "is a folder"),
        ([], "give --text \\(repeatable\\) or --input"),
        (["--text", "a", "--text-pair", "b", "--text-pair", "c"], "--text-pair: 2 given for 1 --text"),
    ]:
        assert main(["classify", str(out), *argv]) == 2
        assert message.replace("\\", "") in capsys.readouterr().err or pytest.fail(message)
    assert (tmp_path / "in.jsonl").read_text().count("\n") == 5  # the input is never replaced


def test_families_and_verbs_do_not_mix(families, tiny_export, capsys):
    tmp, runs = families
    base, adapter, _ = runs["bert"]
    out = tmp / "onnx-mix"
    export(ExportConfig(model=str(base), adapter=str(adapter), out=str(out), mode="merged"))
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "is an encoder (classify) export; `qlora-rt generate` runs decoders: use `qlora-rt classify`" in \
        capsys.readouterr().err
    assert main(["classify", str(tiny_export), "--text", "hi"]) == 2
    assert "is a decoder (causal-lm) export; `qlora-rt classify` runs encoders: use `qlora-rt generate` or" in \
        capsys.readouterr().err
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp / "onnx-kv"),
                 "--kv-cache", "fp16"]) == 2
    assert "is an encoder, which keeps no KV cache" in capsys.readouterr().err and not (tmp / "onnx-kv").exists()


def test_the_plain_op_graph_is_the_same_model(families, tmp_path, monkeypatch):
    """The other choice of ops (fused vs standard; bench/encoder_ops.py compares speed) computes the same model."""
    import qlora_rt.export.encoder_graph as encoder

    _, runs = families
    base, adapter, pairs = runs["bert"]
    monkeypatch.setattr(encoder, "FUSED_ATTENTION", not encoder.FUSED_ATTENTION)
    monkeypatch.setattr(encoder, "FUSED_NORM", not encoder.FUSED_NORM)
    report = export(ExportConfig(model=str(base), adapter=str(adapter), out=str(tmp_path / "plain"), mode="merged"))
    assert report["max_abs_logit_diff"] <= 1e-4
