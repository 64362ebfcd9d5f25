"""An export loads as written in the runtimes that put models on devices (docs/devices.md), and gives
the same tokens as qlora-rt's own runtime: onnxruntime-genai (with its adapter API), Hugging Face's
loaders (config.json, tokenizer files), and onnxruntime's ORT format."""

from __future__ import annotations

import json
import queue

import numpy as np
import onnx
import onnxruntime_genai as og  # the test extra installs it: a missing one fails, never skips
import pytest
from conftest import CORPUS, genai_greedy, save_checkpoint, write_jsonl

from qlora_rt.runtime import Model
from qlora_rt.runtime import graph_io as io

PROMPTS = ["the quick brown", "hello world, how are you today? the capital of", "one"]
NEW = 10


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    """train's defaults (an int4 base) on a tiny Llama, exported adapter-aware with its adapter (and --ort-format),
    with fp32 activations: the runtimes' tokens are compared exactly (see test_genai_gives_our_tokens_on_smollm2)."""
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    d = tmp_path_factory.mktemp("devices")
    ck = save_checkpoint(d / "tiny", seed=4)
    data = write_jsonl(d / "train.jsonl", [{"text": CORPUS[i % 5]} for i in range(24)])
    adapter = train(TrainConfig(model=str(ck), data=str(data), out=str(d / "run"), steps=8, rank=4, lr=3e-2,
                                batch_size=2, seq_len=64, checkpoint_every=0, eval_every=0)).adapter
    export(ExportConfig(model=str(ck), adapter=str(adapter), out=str(d / "onnx"), ort_format=True, int4_compute="fp32"))
    return d / "onnx"



def test_an_fp16_kv_cache_keeps_the_logits_and_runs_in_genai_and_the_server(int4_export, tmp_path):
    """`export --kv-cache fp16`: past and present in fp16 (half the cache's memory), attention computed in fp16.
    Our logits stay within what fp16 rounding explains of the fp32 cache's: each layer rounds q, k, v and the
    attention output to 11 significant bits (2^-11 of a value each), allowed 4 x 2^-11 of the logits' largest
    magnitude a layer; genai and the serving engine give our runtime's tokens (the same kernels)."""
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.runtime.batching import Engine, Request

    out = tmp_path / "kv16"
    export(ExportConfig(model=str(int4_export.parent / "tiny"), adapter=str(int4_export.parent / "run" / "adapter"),
                        out=str(out), int4_compute="fp32", kv_cache="fp16"))
    m16, m32 = Model(out), Model(int4_export)
    assert m16.meta.kv_cache_dtype == "float16"
    assert {i.type for i in m16.session.get_inputs() if i.name.startswith("past_key_values.")} == {"tensor(float16)"}
    assert json.loads((out / "config.json").read_text())["transformers.js_config"]["kv_cache_dtype"] == "float16"
    ids, ours = _ours(out, "default")
    for x, tokens in zip(ids, ours):
        seq = x + tokens
        want = m32.logits(seq, "default")
        bound = 4 * 2**-11 * np.abs(want).max() * m16.meta.layers
        assert np.abs(m16.logits(seq, "default") - want).max() <= bound
        assert genai_greedy(out, x, NEW, "default")[:len(tokens)] == tokens
    engine = Engine(m16, max_batch=2)
    engine.add_adapter("default", "default")
    try:
        q = queue.Queue()
        engine.submit(Request(ids[0], "default", NEW, ignore_eos=True), q.put)
        served = []
        while not (ev := q.get(timeout=60)).finish:
            served += ev.tokens
        assert served == ours[0]
    finally:
        engine.close(5)

def _ours(folder, adapter=None, prompts=PROMPTS, chat=False):
    """Our runtime's greedy tokens (the prompts' rows decoded side by side) and the prompts' token ids."""
    m = Model(folder)
    ids = [m.encode(p, chat=chat) if chat else m.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    return ids, [c.tokens for c in m.generate_ids(ids, adapter=adapter, max_new_tokens=NEW, ignore_eos=True)]


def _genai(folder, ids, adapter=None):
    """Greedy tokens from onnxruntime-genai for a batch of prompts (it pads them on the right)."""
    model = og.Model(str(folder))
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    width = max(map(len, ids))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW, do_sample=False, batch_size=len(ids))
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(np.array([x + [pad] * (width - len(x)) for x in ids], np.int32))
    out = [[] for _ in ids]
    for _ in range(NEW):
        gen.generate_next_token()
        for row, token in zip(out, gen.get_next_tokens()):
            row.append(int(token))
    return out


@pytest.mark.slow
def test_genai_gives_our_tokens_on_smollm2(tmp_path):
    """The bundled SmolLM2-135M, trained a few steps with the defaults and exported adapter-aware: genai's
    greedy tokens equal ours, with and without the adapter, batched (right-padded) and alone. With fp32
    activations: int8 ones round each row's inputs, which amplifies the last-bit differences of another
    padding layout into other tokens where two are nearly tied (docs/devices.md)."""
    from pathlib import Path

    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "dates-train.jsonl"
    adapter = train(TrainConfig(model="smollm2-135m", data=str(data), out=str(tmp_path / "run"), steps=6,
                                batch_size=2, seq_len=128, lr=2e-3, eval_every=0, checkpoint_every=0)).adapter
    folder = tmp_path / "onnx"
    report = export(ExportConfig(model="smollm2-135m", adapter=str(adapter), out=str(folder), int4_compute="fp32"))
    # the tied Q8_0 embedding read from its stored bytes (GatherBlockQuantized), exactly: no fp32 table
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    from qlora_rt.runtime.manifest import MIN_ONNXRUNTIME_8BIT_GATHER  # which onnxruntime 1.22 refuses
    assert json.loads((folder / "qlora_rt_export.json").read_text())["min_onnxruntime"] == MIN_ONNXRUNTIME_8BIT_GATHER
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    prompts = ["Rewrite 4 July 2047 as ISO 8601.", "What is the capital of France?", "Hi"]
    eos = set(json.loads((folder / "qlora_rt_export.json").read_text())["eos_token_ids"])

    def upto_eos(rows):  # genai ends a row at its end-of-text token, then pads it
        return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]

    for name in (None, "default"):
        ids, ours = _ours(folder, name, prompts, chat=True)
        assert upto_eos(_genai(folder, ids, name)) == upto_eos(ours)
        assert upto_eos([_genai(folder, [x], name)[0] for x in ids]) == upto_eos(ours)


@pytest.mark.parametrize("adapter", [None, "default"])
def test_genai_loads_the_export_and_gives_our_tokens(int4_export, adapter):
    ids, ours = _ours(int4_export, adapter)
    assert _genai(int4_export, ids, adapter) == ours, "genai's right-padded batch == our left-padded one"
    assert [_genai(int4_export, [x], adapter)[0] for x in ids] == ours
    if adapter:
        assert ours != _ours(int4_export)[1], "the adapter changes the tokens (else this test proves little)"


def test_genai_runs_a_merged_export(merged_export):
    ids, ours = _ours(merged_export)
    assert _genai(merged_export, ids) == ours


def test_the_graph_names_its_dims_as_genai_and_optimum_do(int4_export):
    graph = onnx.load(str(int4_export / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims[io.INPUT_IDS] == [io.BATCH, io.SEQUENCE]
    assert dims[io.ATTENTION_MASK] == [io.BATCH, io.TOTAL_SEQUENCE]
    assert dims[io.PAST_KEY % 0][::2] == [io.BATCH, io.PAST_SEQUENCE]
    assert dims[io.PRESENT_VALUE % 1][::2] == [io.BATCH, io.TOTAL_SEQUENCE]


def test_hugging_face_loaders_read_the_folder(int4_export):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(int4_export)
    assert (config.model_type, config.num_hidden_layers, config.architectures) == ("llama", 2, ["LlamaForCausalLM"])
    assert "quantization_config" not in json.loads((int4_export / "config.json").read_text())
    assert json.loads((int4_export / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast", "a class transformers 4.x knows too"
    tok = AutoTokenizer.from_pretrained(int4_export)
    assert set(tok(PROMPTS[1])) == {"input_ids", "attention_mask"}, "what the graph takes: generate() refuses more"
    assert tok.encode(PROMPTS[1], add_special_tokens=False) == Model(int4_export).tokenizer.encode(
        PROMPTS[1], add_special_tokens=False).ids
    assert GenerationConfig.from_pretrained(int4_export).eos_token_id is not None


def test_ort_format_is_written_checked_and_takes_the_adapter(int4_export, tmp_path):
    """ORT Mobile: --ort-format writes model.ort and the operator list of a minimal build; model.ort gives
    model.onnx's logits with the adapter applied through onnxruntime's own LoraAdapter."""
    import onnxruntime as ort

    from qlora_rt.export.devices import _probe, write_ort_format

    report = json.loads((int4_export / "export_report.json").read_text())
    assert report["ort_format_max_abs_logit_diff"] <= 1e-4 and report["files_bytes"]["model.ort"] > 0

    folder = tmp_path / "onnx"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx_data"):
        (folder / name).write_bytes((int4_export / name).read_bytes())
    adapter = int4_export / "adapters" / "default.onnx_adapter"
    assert write_ort_format(folder, adapter) <= 1e-4
    ops = (folder / "model.required_operators.config").read_text()
    assert "com.microsoft;1;" in ops and "GroupQueryAttention" in ops and "MatMulNBits" in ops
    assert np.abs(_probe(folder / "model.ort", adapter) - _probe(folder / "model.ort", None)).max() > 1e-3, \
        "the adapter applies to model.ort"
    assert ort.InferenceSession(str(folder / "model.ort")).get_inputs()[0].name == io.INPUT_IDS


def test_an_onnxruntime_older_than_the_export_needs_is_one_line(int4_export, tmp_path):
    import shutil

    from qlora_rt.errors import QloraError
    from qlora_rt.runtime.manifest import MIN_ONNXRUNTIME, _version

    meta = json.loads((int4_export / "qlora_rt_export.json").read_text())
    assert meta["min_onnxruntime"] == MIN_ONNXRUNTIME
    assert _version("1.22.0") < _version("1.23.0.dev20250101") < _version("1.23.1+cpu") < _version("10.0")
    folder = shutil.copytree(int4_export, tmp_path / "onnx")
    (folder / "qlora_rt_export.json").write_text(json.dumps({**meta, "min_onnxruntime": "99.0.0"}))
    with pytest.raises(QloraError, match=r"needs onnxruntime >= 99\.0\.0; this is .*pip install -U"):
        Model(folder)


@pytest.mark.parametrize("which", ["merged", "adapter-aware base"])
def test_transformers_js_loads_the_export_and_gives_our_tokens(which, merged_export, int4_export, tmp_path):
    """transformers.js in Node (its onnxruntime-node), loaded as docs/devices.md says: its tokenizer's ids and its
    greedy tokens equal ours (transformers.js has no adapter API: merged exports, or an adapter-aware one's base)."""
    import os
    import subprocess
    from pathlib import Path

    folder = merged_export if which == "merged" else int4_export
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps(PROMPTS))
    script = Path(__file__).parent / "web" / "transformers_js.mjs"
    done = subprocess.run(["node", str(script), str(folder), str(spec), str(NEW)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    eos = set(Model(folder).meta.eos_token_ids)
    ids, ours = _ours(folder, None)
    for got, x, want in zip(json.loads(done.stdout), ids, ours):
        assert got["ids"] == x
        tokens = got["tokens"][: next((i for i, t in enumerate(got["tokens"]) if t in eos), len(got["tokens"]))]
        assert tokens == want[: len(tokens)] and (len(tokens) == NEW or want[len(tokens)] in eos), (got, want)


OPTIMUM = ["torch==2.13.0", "transformers==4.57.*", "optimum==2.1.*", "optimum-onnx==0.1.*", "onnxruntime"]
OPTIMUM_RUN = """
import json, sys
import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
opts = ort.SessionOptions()
opts.log_severity_level = 3
tok = AutoTokenizer.from_pretrained(folder)
model = ORTModelForCausalLM.from_pretrained(folder, session_options=opts)
out = []
for p in prompts:
    enc = tok(p, add_special_tokens=False, return_tensors="pt")
    seq = model.generate(**enc, max_new_tokens=new, do_sample=False)
    out.append({"ids": enc.input_ids[0].tolist(), "tokens": seq[0, enc.input_ids.shape[1]:].tolist()})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_optimum_loads_the_export_and_gives_our_tokens(int4_export, tmp_path):
    """Optimum's ORTModelForCausalLM with transformers 4.57 (its own venv: this one has transformers 5), loaded
    as docs/devices.md says: its tokenizer's ids and greedy tokens equal ours (the adapter-aware export's base)."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *OPTIMUM], check=True)
    done = subprocess.run([py, "-c", OPTIMUM_RUN, str(int4_export), json.dumps(PROMPTS), str(NEW)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    eos = set(Model(int4_export).meta.eos_token_ids)
    ids, ours = _ours(int4_export, None)
    for got, x, want in zip(json.loads(done.stdout.strip().splitlines()[-1]), ids, ours):
        assert got["ids"] == x
        tokens = got["tokens"][: next((i for i, t in enumerate(got["tokens"]) if t in eos), len(got["tokens"]))]
        assert tokens == want[: len(tokens)] and (len(tokens) == NEW or want[len(tokens)] in eos), (got, want)
