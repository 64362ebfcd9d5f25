"""The browser runtime (`qlora-rt web`): the page, run by onnxruntime-web in a real headless Chromium, gives
`qlora-rt generate`'s greedy tokens for the base and for each adapter, switching adapters back and forth in
one page without reloading the base.

Needs Node.js, the npm packages of qlora_rt/web (`npm ci` there) and Chromium: scripts/setup.sh installs
them, and a machine without them fails here with the command that installs them (never a skip)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import CORPUS, save_checkpoint, write_jsonl

from qlora_rt.errors import QloraError
from qlora_rt.runtime import Model
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.web import WEB, build_site, make_server

DRIVER = Path(__file__).parent / "web" / "drive.mjs"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NEW = 12


def _needs_browser() -> None:
    missing = [what for what, ok in (("node", shutil.which("node")), (CHROMIUM, Path(CHROMIUM).is_file()),
                                     ("qlora_rt/web/node_modules", (WEB / "node_modules" / "puppeteer-core").is_dir()))
               if not ok]
    if missing:
        pytest.fail(f"the browser tests need {', '.join(missing)}: run `bash scripts/setup.sh` (it runs `npm ci` "
                    "in qlora_rt/web and installs Debian's chromium)", pytrace=False)


@pytest.fixture(scope="module")
def web_export(tmp_path_factory):
    """train's defaults (an int4 base) on a tiny Llama, exported adapter-aware with two adapters: `default` (r=4,
    every Linear) and `qv` (r=8, q/v only), as a user would add a second one."""
    from qlora_rt.cli import main
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    d = tmp_path_factory.mktemp("web")
    ck = save_checkpoint(d / "tiny", seed=4)
    runs = {}
    for name, rank, targets, texts in (("default", 4, "all-linear", CORPUS[:5]),
                                       ("qv", 8, "q_proj,v_proj", CORPUS[4:5])):
        data = write_jsonl(d / f"{name}.jsonl", [{"text": texts[i % len(texts)]} for i in range(24)])
        runs[name] = train(TrainConfig(model=str(ck), data=str(data), out=str(d / name), steps=8, rank=rank, lr=3e-2,
                                       targets=targets, seed=rank, batch_size=2, seq_len=64, checkpoint_every=0,
                                       eval_every=0)).adapter
    # fp32 activations: what the page computes, so its tokens equal the native runtime's (docs/devices.md)
    export(ExportConfig(model=str(ck), adapter=str(runs["default"]), out=str(d / "onnx"), int4_compute="fp32"))
    assert main(["export-adapter", "--adapter", str(runs["qv"]), "--onnx", str(d / "onnx"), "--name", "qv"]) == 0
    return d / "onnx"


# Chromium's software Vulkan (SwiftShader) as a WebGPU adapter: the WebGPU path runs here without a GPU
SOFTWARE_WEBGPU = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader",
                   "--use-webgpu-adapter=swiftshader"]


def run_page(site: Path, cases: list[dict], tmp_path: Path, timeout: float = 600, loads: bool = True,
             **options) -> dict:
    """Serve the site on a free port, drive it in headless Chromium, return the driver's JSON (loads: the page
    must load and log no error). options: chromiumArgs, query (tests/web/drive.mjs)."""
    _needs_browser()
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = tmp_path / "cases.json"
        spec.write_text(json.dumps({"cases": cases, "timeoutMs": int(timeout * 1000), **options}))
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        done = subprocess.run(["node", str(DRIVER), url, str(spec)], capture_output=True, text=True,
                              timeout=timeout + 60, env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, f"the driver failed:\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout)
    if not loads:
        return out
    assert out["page"]["error"] is None, out
    errors = [line for line in out["console"] if line.startswith(("error", "pageerror", "crash"))]
    assert not errors, errors
    return out


def _ours(folder: Path, prompt: str, adapter: str | None, chat: bool = False, new: int = NEW):
    m = Model(folder)
    ids = m.encode(prompt, chat=chat)
    return ids, m.generate_ids([ids], adapter=adapter, max_new_tokens=new)[0]


def test_the_page_gives_generates_tokens_switching_adapters(web_export, tmp_path):
    """Greedy tokens, text and prompt ids equal `qlora-rt generate`'s for the base and both adapters, in the
    order base, default, qv, default, base (one page, one session: the adapters switch per request); the form's
    Generate button gives the same; a seeded sampled reply repeats with its seed."""
    site = build_site(web_export, tmp_path / "site")
    order = [(None, "the quick brown", False), ("default", "the quick brown", False), ("qv", "the quick brown", False),
             ("default", "hello world, how are you", True), (None, "hello world, how are you", True)]
    cases = [{"api": {"prompt": p, "options": {"maxNewTokens": NEW, "adapter": a, "chat": c}}} for a, p, c in order]
    cases.append({"ui": {"prompt": "what is the capital", "adapter": "qv", "chat": False, "maxNewTokens": NEW}})
    sampled = {"maxNewTokens": NEW, "adapter": "default", "temperature": 0.9, "topP": 0.9, "topK": 50, "seed": 7}
    cases += [{"api": {"prompt": "one two", "options": sampled}}] * 2
    out = run_page(site, cases, tmp_path)
    assert out["page"]["adapters"] == ["default", "qv"] and out["page"]["crossOriginIsolated"]
    assert out["page"]["device"] == "wasm", "no WebGPU adapter in this headless Chromium: the CPU build"
    results = out["results"]
    for (adapter, prompt, chat), got in zip(order, results):
        ids, want = _ours(web_export, prompt, adapter, chat)
        assert "error" not in got, got
        assert got["promptIds"] == ids, (adapter, prompt)
        assert (got["tokens"], got["text"]) == (want.tokens, want.text), (adapter, prompt)
    by_adapter = {a: tuple(r["tokens"]) for (a, p, c), r in zip(order[:3], results)}
    assert len(set(by_adapter.values())) == 3, "each adapter changes the tokens (else switching proves little)"
    assert results[5]["tokens"] == _ours(web_export, "what is the capital", "qv")[1].tokens, results[5]
    assert results[6]["tokens"] == results[7]["tokens"] and len(results[6]["tokens"]) > 0


def test_the_page_on_webgpu_gives_the_same_tokens(web_export, tmp_path):
    """The WebGPU build (software Vulkan here, a GPU on a device): greedy tokens equal `qlora-rt generate`'s for
    the base and both adapters, switched back and forth (the adapters' tensors uploaded once, fed from the GPU),
    with the KV cache kept on the GPU from step to step."""
    site = build_site(web_export, tmp_path / "site")
    order = [None, "default", "qv", "default", None]
    cases = [{"api": {"prompt": "the quick brown", "options": {"maxNewTokens": NEW, "adapter": a}}} for a in order]
    out = run_page(site, cases, tmp_path, chromiumArgs=SOFTWARE_WEBGPU, query="?device=webgpu")
    assert out["page"]["device"] == "webgpu", out["page"]
    for adapter, got in zip(order, out["results"]):
        assert got.get("tokens") == _ours(web_export, "the quick brown", adapter)[1].tokens, (adapter, got)
        assert got["cacheLocation"] == "gpu-buffer", "the KV cache stays on the GPU between steps"


def test_the_page_stops_at_eos_and_stop_strings_and_says_bad_options_in_one_line(web_export, tmp_path):
    import numpy as np
    import onnxruntime as ort

    site = build_site(web_export, tmp_path / "site")
    ids, long = _ours(web_export, "the quick brown", "default", new=NEW)
    # adapters the page is pointed at by URL (not checked when the site was written): cut short, and of another model
    good = (site / "model" / "adapters" / "qv.onnx_adapter").read_bytes()
    (site / "model" / "adapters" / "cut.onnx_adapter").write_bytes(good[: len(good) // 2])
    other = ort.AdapterFormat()
    other.set_parameters({"model.layers.0.self_attn.o_proj.lora_A": ort.OrtValue.ortvalue_from_numpy(
        np.zeros((4, 7), np.float32))})
    other.export_adapter(str(site / "model" / "adapters" / "other.onnx_adapter"))
    stop = long.text[3:6]
    cases = [{"api": {"prompt": "the quick brown", "options": {"maxNewTokens": NEW, "adapter": "default",
                                                               "stop": [stop]}}},
             {"api": {"prompt": "the quick brown", "options": {"adapter": "nope"}}},
             {"api": {"prompt": "  ", "options": {}}},
             {"api": {"prompt": "x", "options": {"temperature": -1}}},
             {"api": {"prompt": "x", "options": {"ids": list(range(300))}}},
             {"api": {"prompt": "the quick brown", "stream": True,
                      "options": {"maxNewTokens": NEW, "adapter": "default", "stop": [stop]}}},
             {"api": {"prompt": "the quick brown", "stream": True, "options": {"maxNewTokens": NEW}}},
             {"api": {"prompt": "x", "options": {"adapter": "adapters/cut.onnx_adapter"}}},
             {"api": {"prompt": "x", "options": {"adapter": "adapters/other.onnx_adapter"}}}]
    r = run_page(site, cases, tmp_path)["results"]
    assert re.fullmatch(r"QloraError: http://127\.0\.0\.1:\d+/model/adapters/cut\.onnx_adapter: not a readable "
                        r"\.onnx_adapter file \(.+\)", r[7]["error"]), r[7]
    assert r[8]["error"].endswith("other.onnx_adapter: model.layers.0.self_attn.o_proj.lora_A [4,7] is not a LoRA "
                                  "input of this export (an adapter of another model?)"), r[8]
    assert r[6]["cacheLocation"] == "cpu", "wasm: the cache is the CPU's"
    want = Model(web_export).generate_ids([ids], adapter="default", max_new_tokens=NEW, stop=[stop])[0]
    # streamed pieces add up to the reply (a stop string's start held back, never sent then taken back)
    assert (r[5]["streamed"], r[5]["finishReason"]) == (want.text, "stop"), r[5]
    assert r[6]["streamed"] == r[6]["text"] == _ours(web_export, "the quick brown", None)[1].text, r[6]
    assert (r[0]["text"], r[0]["finishReason"]) == (want.text, "stop") == (long.text[: long.text.index(stop)], "stop")
    assert r[1]["error"] == 'QloraError: no adapter named "nope" (available: default, qv)'
    assert r[2]["error"] == "QloraError: the prompt is empty"
    assert r[3]["error"].startswith("QloraError: temperature must be >= 0")
    assert r[4]["error"] == "QloraError: the prompt is 300 tokens; this export's context is 256 tokens"



def _page_replies(web_export: Path, tmp_path: Path, page: dict | None = None, **export_kw
                  ) -> tuple[Path, list[tuple[str | None, dict]]]:
    """web_export's base and its `default` adapter exported with export_kw, as a site: the folder, and the page's
    greedy replies (adapter, result) to one prompt, base and adapter (page: run_page's options)."""
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    folder = tmp_path / "export"
    export(ExportConfig(model=str(web_export.parent / "tiny"), adapter=str(web_export.parent / "default" / "adapter"),
                        out=str(folder), **export_kw))
    site = build_site(folder, tmp_path / "site")
    order = [None, "default"]
    cases = [{"api": {"prompt": "the quick brown", "options": {"maxNewTokens": NEW, "adapter": a}}} for a in order]
    return folder, list(zip(order, run_page(site, cases, tmp_path, **(page or {}))["results"]))


def test_an_fp16_kv_cache_export_runs_in_the_page(web_export, tmp_path):
    """`export --kv-cache fp16`: the page feeds and carries an fp16 cache, and its greedy tokens are `generate`'s,
    with and without the adapter. A WebGPU adapter without fp16 shaders (Chromium's software one) cannot run it:
    the page's default device then takes wasm, and ?device=webgpu says why in one line."""
    folder, replies = _page_replies(web_export, tmp_path, {"chromiumArgs": SOFTWARE_WEBGPU},
                                    int4_compute="fp32", kv_cache="fp16")
    for adapter, got in replies:
        assert got.get("tokens") == _ours(folder, "the quick brown", adapter)[1].tokens, (adapter, got)
        assert got["cacheLocation"] == "cpu", "no shader-f16 on the software adapter: wasm"
    out = run_page(tmp_path / "site", [], tmp_path, loads=False, chromiumArgs=SOFTWARE_WEBGPU, query="?device=webgpu")
    assert out["page"]["error"].endswith("keeps its KV cache in fp16, which this browser's WebGPU adapter cannot "
                                         "compute (no shader-f16): open the page with ?device=wasm, or export with "
                                         "--kv-cache fp32"), out["page"]


def test_an_int8_export_runs_in_the_page_as_generate_does(web_export, tmp_path, capsys):
    """`export --weights int8` (MatMulInteger with int8 activations per row: what onnxruntime-web's wasm build has
    fast kernels for): the page decodes, base and adapter, picking at each step the token our runtime rates best
    given the same tokens before it, or one within 1% of the logits' range of it (an activation rounded to int8
    rounds the other way where the fp32 arithmetic before it differs in its last bit between the two builds; such a
    flip moves a logit by about one step of a weight's int8 grid times an activation's, far below 1% of the range,
    so a tie may go either way, nothing more); `web` tells an int4 export's owner about the format."""
    folder, replies = _page_replies(web_export, tmp_path, weights="int8")
    report = json.loads((folder / "export_report.json").read_text())
    assert report["tolerance"] is None and report["int8_requantized"] > 0, "approximate: judged by its distributions"
    graph = (folder / "model.onnx").read_bytes()
    assert b"MatMulInteger" in graph and b"MatMulNBits" not in graph
    assert "--weights int8" not in capsys.readouterr().err
    build_site(web_export, tmp_path / "site4")
    assert "`qlora-rt export --weights int8` writes the page's fast format" in capsys.readouterr().err
    ours = Model(folder)
    for adapter, got in replies:
        assert len(got.get("tokens", [])) == NEW, got
        z = ours.logits(got["promptIds"] + got["tokens"], adapter)[len(got["promptIds"]) - 1:-1]  # each pick's logits
        best, span = z.max(-1), z.max(-1) - z.min(-1)
        assert all(z[i, t] >= best[i] - 0.01 * span[i] for i, t in enumerate(got["tokens"])), (adapter, got)


def test_a_merged_export_runs_in_the_page(merged_export, tmp_path, capsys):
    """A merged export (no adapters to choose): the page's tokens equal ours where the export's 4-bit products
    take fp32 activations; an int8-activation export is said to differ on the web when the site is written."""
    site = build_site(merged_export, tmp_path / "site")
    int8 = Model(merged_export).meta.int4_activations == "int8"
    assert ("Export with --int4-compute fp32 for native tokens equal to the page's" in capsys.readouterr().err) == int8
    assert json.loads((site / "model" / "adapters.json").read_text()) == []
    case = [{"api": {"prompt": "the capital of", "options": {"maxNewTokens": NEW}}}]
    ids, want = _ours(merged_export, "the capital of", None)
    for page in ({}, {"chromiumArgs": SOFTWARE_WEBGPU, "query": "?device=webgpu"}):  # wasm, then WebGPU
        got = run_page(site, case, tmp_path, **page)["results"][0]
        assert got["cacheLocation"] == ("gpu-buffer" if page else "cpu")
        if not int8:
            assert got["tokens"] == want.tokens, page
        else:
            assert len(got["tokens"]) == NEW


def test_the_site_is_plain_files_with_the_export_beside_the_page(web_export, tmp_path, capsys):
    from qlora_rt.cli import main

    assert main(["web", str(web_export), "--out", str(tmp_path / "site")]) == 0
    site = tmp_path / "site"
    page = (site / "index.html").read_text()
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', page).group(1))["imports"]
    assert set(imports) == {"onnxruntime-web", "onnxruntime-web/webgpu", "@huggingface/tokenizers",
                            "@huggingface/jinja"}
    assert all((site / path).is_file() for path in imports.values()), "every import resolves to a file of the site"
    assert (site / "vendor" / "onnxruntime-web" / "ort-wasm-simd-threaded.wasm").stat().st_size > 1e6
    assert {p.name for p in (site / "model" / "adapters").iterdir()} == {"default.onnx_adapter", "qv.onnx_adapter"}
    import numpy as np
    import onnx
    import onnxruntime as ort

    meta = Model(web_export).meta
    mine, theirs = (onnx.load(f / "model.onnx", load_external_data=False) for f in (site / "model", web_export))
    assert (mine.graph.node, mine.graph.input, mine.graph.output, mine.opset_import) == \
        (theirs.graph.node, theirs.graph.input, theirs.graph.output, theirs.opset_import), "the same graph"
    kept = {t.name: t for t in mine.graph.initializer}
    assert {t.name for t in theirs.graph.initializer} - set(kept) == set(meta.lora_inputs), \
        "the LoRA inputs' defaults gone (the page feeds them), nothing else"
    assert all(t == kept[t.name] for t in theirs.graph.initializer if t.name in kept and t.name != io.LOGITS_TO_KEEP)
    assert onnx.numpy_helper.to_array(kept[io.LOGITS_TO_KEEP]) == 1
    past = {n: np.zeros((1, meta.kv_heads, 0, meta.head_dim), np.float32) for n in io.past_names(meta.layers)}
    feeds = {io.INPUT_IDS: np.array([[5, 6, 7]]), io.ATTENTION_MASK: np.ones((1, 3), np.int64),
             io.POSITION_IDS: np.arange(3)[None], **past}
    base = {n: np.zeros([d or 0 for d in meta.lora_inputs[n]], np.float32) for n in meta.lora_inputs}
    last = {io.LOGITS_TO_KEEP: np.array(1, np.int64)}
    runs = ((web_export, feeds), (web_export, {**feeds, **last}), (site / "model", {**feeds, **base}))
    ours, ours_last, page = (ort.InferenceSession(str(d / "model.onnx")).run([io.LOGITS], f)[0] for d, f in runs)
    assert (ours.shape, page.shape) == ((1, 3, meta.vocab), (1, 1, meta.vocab)), "the last position's logits only"
    assert np.array_equal(page, ours_last), "fed rank-0 LoRA inputs, the base's logits as the defaults gave"
    about = json.loads((site / "qlora_rt_site.json").read_text())
    assert about["export"] == web_export.name, "the published site names no path of this machine"
    assert main(["web", str(web_export), "--out", str(site)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["web", str(web_export), "--out", str(site), "--overwrite"]) == 0
    assert main(["web", str(web_export), "--out", str(web_export.parent), "--overwrite"]) == 2
    assert "not written by `qlora-rt web`" in capsys.readouterr().err, "never replaces a folder it did not write"


def test_serve_gives_the_sites_files_only_and_to_its_own_host_name(tmp_path):
    """`web --serve`: no directory listings, nothing a symlink in the site points to outside it, and a request
    whose Host is another name (DNS rebinding: a page elsewhere whose name now resolves to 127.0.0.1) is a 403."""
    import http.client

    site = tmp_path / "site"
    (site / "model").mkdir(parents=True)
    (site / "qlora_rt_site.json").write_text("{}")
    (site / "index.html").write_text("<p>page</p>")
    (site / "model" / "tokenizer.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("not the site's")
    (site / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (site / "model" / "up").symlink_to(tmp_path)
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def get(path, host=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    try:
        assert get("/") == (200, b"<p>page</p>") and get("/", f"localhost:{port}")[0] == 200
        assert get("/model/tokenizer.json", f"[::1]:{port}")[0] == 200
        assert get("/model/")[0] == 404 and get("/model")[0] in (301, 404)  # no listing
        assert get("/leak.txt")[0] == 404 and get("/model/up/secret.txt")[0] == 404
        assert get("/", "attacker.example")[0] == 403 and get("/", f"attacker.example:{port}")[0] == 403
    finally:
        server.shutdown()
        server.server_close()
    from qlora_rt.runtime.web import allowed_host

    assert allowed_host("anything.example", "0.0.0.0") and allowed_host("192.168.1.5:8000", "192.168.1.5")
    assert not allowed_host("other:8000", "192.168.1.5") and not allowed_host(None, "127.0.0.1")


def test_a_model_too_large_for_wasm_is_said_when_the_site_is_written(web_export, tmp_path, monkeypatch, capsys):
    import qlora_rt.runtime.web as web

    build_site(web_export, tmp_path / "a")
    assert "addresses 4 GB" not in capsys.readouterr().err
    monkeypatch.setattr(web, "WASM_MODEL_LIMIT", 1000)
    build_site(web_export, tmp_path / "b")
    assert "addresses 4 GB in all and will not load it: the page needs WebGPU" in capsys.readouterr().err


def test_the_site_refuses_what_the_page_could_not_run(web_export, encoder_export, tmp_path):
    with pytest.raises(QloraError, match=r"encoder \(classify\) export; `qlora-rt web` runs decoders"):
        build_site(encoder_export, tmp_path / "a")
    with pytest.raises(QloraError, match=r"needs the npm package onnxruntime-web 1\.31\.1, not found in .*npm ci"):
        build_site(web_export, tmp_path / "b", node_modules=str(tmp_path))
    broken = shutil.copytree(web_export, tmp_path / "broken")
    (broken / "adapters" / "bad.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(QloraError, match="bad.onnx_adapter is not a readable .onnx_adapter file"):
        build_site(broken, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_the_browser_runtime_names_the_graph_io_as_the_python_runtime_does():
    source = (WEB / "qlora-rt.mjs").read_text()
    names = json.loads(re.search(r"export const IO = (\{.*?\});", source, re.S).group(1))
    assert names == {"input_ids": io.INPUT_IDS, "attention_mask": io.ATTENTION_MASK, "position_ids": io.POSITION_IDS,
                     "logits": io.LOGITS, "logits_to_keep": io.LOGITS_TO_KEEP, "past_key": io.PAST_KEY,
                     "past_value": io.PAST_VALUE, "present_key": io.PRESENT_KEY, "present_value": io.PRESENT_VALUE}
    pinned = json.loads((WEB / "package.json").read_text())["dependencies"]
    lock = json.loads((WEB / "package-lock.json").read_text())["packages"]
    assert all(lock[f"node_modules/{name}"]["version"] == v for name, v in pinned.items()), "the lockfile pins them"


def _reply_cases() -> list[dict]:
    """Rows of logits that drive a reply through each way its step can go: greedy to its length, a stop string
    cut, a stop string's start released at the end of text, penalties and a logit bias that change the pick,
    the row's cache filling up, end of text taken as a token (ignore_eos), logits that are not numbers."""
    import numpy as np

    vocab = ["<eos>", "a", "b", "E", "N", "D", " ", "c", "x", "y"]
    rng = np.random.default_rng(0)

    def rows(*best, gap=2.0):  # each row's pick `best[i]` (before any penalty), by `gap` over the rest
        out = rng.normal(0, 0.5, (len(best), len(vocab))).astype(np.float32)
        for r, t in zip(out, best):
            r[t] = r.max() + np.float32(gap)
        return out.tolist()
    case = dict(vocab=vocab, ids=[1, 2, 3], eos=[0], capacity=64)
    nan = rows(1, 2)
    nan[1][4] = "NaN"  # JSON has no NaN: the script and the test each read it as one
    return [
        {**case, "options": {"maxNewTokens": 4}, "logits": rows(1, 2, 7, 8, 9)},
        {**case, "options": {"maxNewTokens": 9, "stop": ["END"]}, "logits": rows(1, 6, 3, 4, 5, 2, 2)},
        {**case, "options": {"maxNewTokens": 9, "stop": ["END", "xy"]}, "logits": rows(1, 3, 4, 8, 0)},
        {**case, "options": {"maxNewTokens": 6, "frequencyPenalty": 1.5, "presencePenalty": 0.5},
         "logits": rows(1, 1, 1, 1, 1, 1, gap=1.0)},
        {**case, "options": {"maxNewTokens": 3, "logitBias": {"8": 5.0, "1": -3.0}}, "logits": rows(1, 1, 1)},
        {**case, "capacity": 5, "options": {"maxNewTokens": 9}, "logits": rows(1, 2, 7, 8)},
        {**case, "options": {"maxNewTokens": 3, "ignoreEos": True}, "logits": rows(0, 1, 0)},
        {**case, "options": {"maxNewTokens": 3}, "logits": nan},
    ]


def test_the_browser_runtime_feeds_and_steps_as_the_python_decode_core():
    """qlora-rt.mjs mirrors runtime/decode.py: the same feeds for a run and the same prompt chunks, and, from
    the same logits, the same picks, text pieces (a stop string's start held back, then released or cut) and
    finish. Greedy: the seeded samplers' generators differ (mulberry32, numpy's PCG64)."""
    from types import SimpleNamespace

    import numpy as np

    from qlora_rt.runtime.decode import FEEDS, PREFILL_CHUNK, Reply, Request, feeds, prompt_chunk, prompt_chunks
    from qlora_rt.runtime.sampling import Sampling

    if not shutil.which("node"):
        _needs_browser()
    source = (WEB / "qlora-rt.mjs").read_text()
    assert json.loads(re.search(r"export const FEEDS = (\[.*?\]);", source).group(1)) == list(FEEDS)
    assert int(re.search(r"export const PREFILL_CHUNK = (\d+);", source).group(1)) == PREFILL_CHUNK
    runs = [([5], 1, 1), ([5, 6, 7], 3, 1), ([9], 130, 1), (list(range(64)), 128, 0)]
    chunks = [(list(range(3)), 0, {}), (list(range(130)), 0, {}), (list(range(200)), 128, {}),
              (list(range(130)), 0, {"long_rope_from": 100}), (list(range(90)), 0, {"long_rope_from": 100})]
    cases = _reply_cases()
    spec = Path(os.environ.get("TMPDIR", "/tmp")) / f"decode-core-{os.getpid()}.json"
    rng = np.random.default_rng(1)
    picks = [{"logits": (rng.normal(0, scale, 3000)).astype(np.float32).tolist(),
              "options": {"temperature": t, "topK": k, "topP": p}}
             for scale, t, k, p in ((1, 0.7, 0, 0.9), (6, 1.0, 40, 0.95), (3, 0.5, 200, 1.0), (0.3, 1.3, 0, 0.5))]
    spec.write_text(json.dumps({"feeds": runs, "chunks": chunks, "replies": cases, "picks": picks}))
    try:
        done = subprocess.run(["node", str(Path(__file__).parent / "web" / "decode_core.mjs"), str(spec)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "NODE_NO_WARNINGS": "1"})
    finally:
        spec.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    js = json.loads(done.stdout)
    for (ids, length, keep), got in zip(runs, js["feeds"]):
        want = feeds(np.array([ids]), np.array([length]), keep)
        assert set(got) == set(want)
        for name, (values, dims) in got.items():
            assert values == want[name].ravel().tolist() and dims == list(want[name].shape), (name, ids, length)
    for case, got in zip(picks, js["picks"]):  # the sampler keeps what sampling.py's keeps (top_k, then top_p)
        o, z = case["options"], np.array(case["logits"], np.float32).astype(np.float64) / case["options"]["temperature"]
        order = np.argsort(-z, kind="stable")[: o["topK"] or None]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        kept = order[: int(np.sum(np.cumsum(p) - p < o["topP"]))]
        assert got == [int(kept[0]), int(kept[-1])], (o, len(kept))
    for (ids, start, meta), got in zip(chunks, js["chunks"]):
        chunk = prompt_chunk(SimpleNamespace(long_rope_from=meta.get("long_rope_from")), len(ids))
        assert got == [[end, list(c)] for end, c in prompt_chunks(ids, start, chunk)]
    assert [len(c) for c in js["chunks"]] == [1, 3, 2, 1, 2], "a prompt past LongRoPE's switch runs whole"

    class Tokens:  # the vocabulary's strings, joined
        def __init__(self, vocab):
            self.vocab = vocab

        def decode(self, tokens):
            return "".join(self.vocab[t] for t in tokens)

    finishes = set()
    for case, got in zip(cases, js["replies"]):
        o = case["options"]
        bias = {int(t): b for t, b in o.get("logitBias", {}).items()} or None
        req = Request(case["ids"], max_new_tokens=o["maxNewTokens"], stop=tuple(o.get("stop", ())),
                      ignore_eos=o.get("ignoreEos", False),
                      sampling=Sampling(presence_penalty=o.get("presencePenalty", 0.0),
                                        frequency_penalty=o.get("frequencyPenalty", 0.0), logit_bias=bias))
        reply = Reply(req, Tokens(case["vocab"]), set(case["eos"]), case["capacity"])
        pieces = []
        for row in case["logits"]:
            event = reply.take(np.array([float(v) for v in row], np.float32))
            pieces.append(event.text if event is not None else None)
            if reply.finish:
                break
        assert got == {"pieces": pieces, "tokens": reply.tokens, "finish": reply.finish, "text": reply.text.text}, o
        finishes.add(reply.finish)
    assert finishes == {"stop", "length", "error"}
    held = js["replies"][2]
    assert held["pieces"] == ["a", "", "", "EN", "x"] and held["finish"] == "stop", "held while a stop may begin, " \
        "released at the end of text"
    assert js["replies"][3]["tokens"] != [1] * 6, "the penalties change the picks"


@pytest.mark.slow
def test_the_page_gives_generates_tokens_on_smollm2(tmp_path):
    """The bundled SmolLM2-135M, trained a few steps with the defaults and exported adapter-aware: the page's
    greedy chat replies equal `qlora-rt generate`'s with and without the adapter (int4 products with fp32
    activations: onnxruntime-web's wasm kernels give the native ones' tokens)."""
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "dates-train.jsonl"
    adapter = train(TrainConfig(model="smollm2-135m", data=str(data), out=str(tmp_path / "run"), steps=6,
                                batch_size=2, seq_len=128, lr=2e-3, eval_every=0, checkpoint_every=0)).adapter
    folder = tmp_path / "onnx"
    export(ExportConfig(model="smollm2-135m", adapter=str(adapter), out=str(folder), int4_compute="fp32"))
    site = build_site(folder, tmp_path / "site")
    order = [(a, p) for p in ("Rewrite 4 July 2047 as ISO 8601.", "What is the capital of France?")
             for a in ("default", None)]
    out = run_page(site, [{"api": {"prompt": p, "options": {"maxNewTokens": 24, "adapter": a, "chat": True}}}
                          for a, p in order], tmp_path)
    for (adapter, prompt), got in zip(order, out["results"]):
        ids, want = _ours(folder, prompt, adapter, chat=True, new=24)
        assert (got["promptIds"], got["tokens"]) == (ids, want.tokens), (adapter, prompt)


def test_the_page_runs_gemma3_past_its_sliding_window(tmp_path):
    """A tiny Gemma 3 (tests/test_architectures.py: a window of 4, tanh-GELU, sandwich norms, two RoPE tables),
    trained with train's defaults and exported adapter-aware: the page's greedy tokens for a prompt longer than
    the window equal `qlora-rt generate`'s, with the adapter and without."""
    from test_architectures import TINY

    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    model_type, over, window = TINY["gemma3-small-window"]
    ck = save_checkpoint(tmp_path / "gemma", model_type=model_type, seed=4, **over)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": CORPUS[i % 5]} for i in range(24)])
    adapter = train(TrainConfig(model=str(ck), data=str(data), out=str(tmp_path / "run"), steps=6, lr=3e-2,
                                batch_size=2, seq_len=64, checkpoint_every=0, eval_every=0)).adapter
    export(ExportConfig(model=str(ck), adapter=str(adapter), out=str(tmp_path / "onnx"), int4_compute="fp32"))
    prompt = "the quick brown fox jumps over the lazy dog"
    assert len(Model(tmp_path / "onnx").encode(prompt)) > window
    site = build_site(tmp_path / "onnx", tmp_path / "site")
    cases = [{"api": {"prompt": prompt, "options": {"maxNewTokens": NEW, "adapter": a}}} for a in ("default", None)]
    out = run_page(site, cases, tmp_path)
    for adapter_name, got in zip(("default", None), out["results"]):
        ids, want = _ours(tmp_path / "onnx", prompt, adapter_name)
        assert "error" not in got, got
        assert (got["promptIds"], got["tokens"]) == (ids, want.tokens), adapter_name
