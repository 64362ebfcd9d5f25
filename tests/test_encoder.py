"""The encoder family in training: 4-bit BERT/RoBERTa/DistilBERT classifiers, their data, metrics and adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_encoder, sentiment_rows, write_jsonl
from safetensors import safe_open

from qlora_rt.cli import main
from qlora_rt.config import TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.train.run import train
from qlora_rt.train.tasks import scores
from qlora_rt.trained import open_trained


def config(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data / "train.jsonl"), out=str(out), steps=12, lr=5e-3, batch_size=8,
                rank=4, seq_len=32, checkpoint_every=0, eval_every=0, eval_data=str(data / "eval.jsonl"))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("model_type,quant,heads", [
    ("bert", "nf4", {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}),
    ("roberta", "int4", {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                         "classifier.out_proj.bias"}),
    ("distilbert", "fp4", {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}),
    ("modernbert", "int4", {"head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"}),
])
def test_each_encoder_learns_sentiment_on_a_4bit_base(model_type, quant, heads, sentiment, tmp_path, capfd):
    """Every encoder Linear in 4 bits with LoRA; the head (and BERT's pooler) trained in full and saved with the
    adapter, with the label names; it learns its data (a random tiny encoder is a poor feature extractor, so
    the test fits the training set; held-out accuracy is the real-model test's); metrics and the summary
    carry the scores."""
    base = save_encoder(tmp_path / "base", model_type)
    # fp32 products: with --dtype auto's bf16 ones a run's last bits follow the CPU's kernels (tests/test_train.py
    # bounds them), and on a 32-example set one example is the 0.9 bound's whole margin
    r = train(config(base, sentiment, tmp_path / "run", quant=quant, steps=56, lr=3e-3, rank=8,
                     eval_data=str(sentiment / "train.jsonl"), dtype="float32"))
    err = capfd.readouterr().err
    assert "task classify (the data has labels): 2 labels (negative, positive)" in err
    assert "confusion matrix at the end" in err and "accuracy" in err
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in records if "eval_accuracy" in x]
    assert [e["step"] for e in evals] == [0, 56]
    # 31-32 of 32 on an AMD EPYC (the run is the same in every process: conftest's tokenizer is written out,
    # not trained); 0.9 leaves each a margin of two examples for another CPU's fp32 kernels
    assert evals[-1]["eval_accuracy"] >= 0.9 > evals[0]["eval_accuracy"], evals
    assert sum(map(sum, evals[-1]["eval_confusion"])) == 32 and 0 <= evals[-1]["eval_macro_f1"] <= 1
    config_json = json.loads((r.adapter / "adapter_config.json").read_text())
    assert config_json["task_type"] == "SEQ_CLS" and config_json["modules_to_save"]
    with safe_open(str(r.adapter / "adapter_model.safetensors"), "pt") as h:
        whole = {k.removeprefix("base_model.model.") for k in h.keys() if "lora_" not in k}
        assert whole == heads and json.loads(h.metadata()["labels"]) == ["negative", "positive"]
        assert any(".lora_A." in k for k in h.keys())
    # rebuilt from base + adapter: the trained classifier (eval-mode logits equal the training run's model)
    loaded, qcfg, info = open_trained(base, r.adapter)
    assert qcfg.format == quant and info.labels == ["negative", "positive"]
    assert loaded.model.config.id2label == {0: "negative", 1: "positive"}


def test_labels_ints_pairs_and_unseen_eval_labels(tiny_bert, tmp_path):
    d = tmp_path
    rows = [{**x, "label": int(x["label"] == "positive")} for x in sentiment_rows(24, 0, pairs=True)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "eval.jsonl", rows[:8] + [{"text": "fine", "text_pair": "day", "label": 7}])
    with pytest.raises(QloraError, match=r"eval.jsonl:9: label 7 is not one of the training data's labels \(0, 1\)"):
        train(config(tiny_bert, d, d / "run", steps=2))
    write_jsonl(d / "eval.jsonl", rows[:8])
    r = train(config(tiny_bert, d, d / "run2", steps=2))
    assert open_trained(tiny_bert, r.adapter)[2].labels == ["0", "1"]


@pytest.mark.parametrize("row,message", [
    ({"text": "good", "label": True}, "'label' must be a non-empty string or an integer"),
    ({"text": "good", "label": 0.5}, "'label' must be a non-empty string or an integer"),
    ({"text": "", "label": "a"}, "'text' must be a non-empty string"),
    ({"text": "good", "text_pair": 3, "label": "a"}, "'text_pair' must be a non-empty string"),
])
def test_bad_classification_rows_are_one_line(tiny_bert, tmp_path, row, message):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "fine", "label": "a"}, row])
    with pytest.raises(QloraError, match=rf"train.jsonl:2: {message}"):
        train(config(tiny_bert, tmp_path, tmp_path / "run", eval_data=None))


def test_task_and_model_family_must_agree(tiny_bert, tiny_llama, tiny_data, sentiment, tmp_path):
    with pytest.raises(QloraError, match="is an encoder: it trains on classification data .*has no 'label'"):
        train(config(tiny_bert, tiny_data, tmp_path / "a", eval_data=None))
    with pytest.raises(QloraError, match="is a decoder: it trains on .*has labels: classification trains an encoder"):
        train(config(tiny_llama, sentiment, tmp_path / "b"))
    with pytest.raises(QloraError, match="--task classify: --model .* is a decoder; --task classify needs an encoder"):
        train(config(tiny_llama, sentiment, tmp_path / "b", task="classify"))
    with pytest.raises(QloraError, match="--task causal-lm needs a decoder"):
        train(config(tiny_bert, sentiment, tmp_path / "c", task="causal-lm"))
    with pytest.raises(QloraError, match="--quant-head: a classifier's head is trained in full"):
        train(config(tiny_bert, sentiment, tmp_path / "d", quant_head=True))


def test_long_texts_are_truncated_and_counted(tiny_bert, tmp_path, capfd):
    rows = sentiment_rows(16, 0)
    rows[3]["text"] = " ".join(["good"] * 80)
    write_jsonl(tmp_path / "train.jsonl", rows)
    train(config(tiny_bert, tmp_path, tmp_path / "run", eval_data=None, steps=1, seq_len=16))
    assert "1 of 16 examples are longer than 16 tokens and were truncated" in capfd.readouterr().err


def test_scores_by_hand():
    s = scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert s["eval_accuracy"] == pytest.approx(3 / 5)
    assert s["eval_confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1: label 0 = 2·1/(2+2) = 0.5; label 1 = 2·2/(3+2) = 0.8; label 2 = 0 (never predicted)
    assert s["eval_macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("kind,targets,heads", [("bert", ["query", "value"], ["classifier", "pooler"]),
                                                ("modernbert", ["Wqkv", "Wi"], ["head", "classifier"])])
def test_adapter_moves_both_ways_with_peft(kind, targets, heads, sentiment, tmp_path):
    """Plain LoRA (--quant none): our classifier adapter loads in PEFT and PEFT's in ours, logits equal."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    tiny_bert = save_encoder(tmp_path / "base", kind)
    r = train(config(tiny_bert, sentiment, tmp_path / "run", quant="none", steps=4, dropout=0.0))
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    ours, _, _ = open_trained(tiny_bert, r.adapter)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    peft = PeftModel.from_pretrained(base, r.adapter).eval()
    with torch.no_grad():
        assert torch.allclose(peft(**batch).logits, ours.model(**batch).logits, atol=1e-5)
    torch.manual_seed(3)
    theirs = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                            PeftConfig(task_type="SEQ_CLS", r=4, target_modules=targets, modules_to_save=heads))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    mine, _, info = open_trained(tiny_bert, tmp_path / "peft", quant_format="none")
    assert info.labels == ["LABEL_0", "LABEL_1"]
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(**batch).logits, mine.model(**batch).logits, atol=1e-5)


def test_train_help_names_the_task(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--task {auto,causal-lm,classify}" in capsys.readouterr().out


def test_interrupted_classifier_run_resumes_to_the_same_adapter_and_head(tiny_bert, sentiment, tmp_path):
    """The head is in every checkpoint: a run cut at step 5 (checkpoint at 4) and resumed equals one that
    never stopped, head included."""
    kw = dict(steps=8, checkpoint_every=4, dropout=0.0)
    train(config(tiny_bert, sentiment, tmp_path / "full", **kw))

    def interrupt(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, sentiment, tmp_path / "cut", **kw), on_step=interrupt)
    train(config(tiny_bert, sentiment, tmp_path / "cut", resume=True, **kw))
    tensors = []
    for run in ("full", "cut"):
        with safe_open(str(tmp_path / run / "adapter" / "adapter_model.safetensors"), "pt") as h:
            tensors.append({k: h.get_tensor(k) for k in h.keys()})
    assert tensors[0].keys() == tensors[1].keys() and "base_model.model.classifier.weight" in tensors[0]
    assert max((tensors[0][k] - tensors[1][k]).abs().max().item() for k in tensors[0]) <= 1e-6


def test_merged_classifier_is_a_plain_transformers_checkpoint(bert_run, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from qlora_rt.merge import merge

    out = merge(str(tiny_bert), str(bert_run), str(tmp_path / "merged"))
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["architectures"] == ["BertForSequenceClassification"]
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    ours = open_trained(tiny_bert, bert_run)[0].model
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-4)
