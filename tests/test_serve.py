"""`qlora-rt serve`: the OpenAI-compatible server and its continuous batching with mixed adapters."""

import asyncio
import json
import queue
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from qlora_rt.runtime import Model  # noqa: E402
from qlora_rt.runtime.batching import PREFILL_CHUNK, Engine, Request  # noqa: E402
from qlora_rt.runtime.sampling import Sampling  # noqa: E402

PROMPTS = ["count to three", "one two", "hello there, how are you", "five", "the cat sat on", "a b c d e f",
           "two three four", "count"]


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def app(tiny_export):
    from qlora_rt.server.app import create_app

    app = create_app(tiny_export, max_batch=4, max_queue=64, served_model_name="tiny")
    yield app
    app.state.qlora.engine.close(5)


# ---- the engine -------------------------------------------------------------------------------------------
def _events(q: queue.Queue) -> list[int]:
    tokens = []
    while True:
        ev = q.get(timeout=60)
        tokens += ev.tokens
        if ev.finish:
            assert ev.finish != "error", ev.error
            return tokens


def test_mixed_adapter_streams_give_the_tokens_each_gives_alone(tiny_export):
    """8 requests over the base and two adapters (different ranks and targets), more than the 3 slots, with
    prompts of different lengths run in chunks of 2: every one decodes exactly what it decodes alone."""
    m = Model(tiny_export)
    engine = Engine(m, max_batch=3, prefill_chunk=2)
    try:
        for name in ("a", "b"):
            engine.add_adapter(name, name)
        jobs = []
        for i, text in enumerate(PROMPTS):
            adapter = (None, "a", "b")[i % 3]
            q = queue.Queue()
            engine.submit(Request(m.encode(text), adapter, max_new_tokens=10, ignore_eos=True), q.put)
            jobs.append((text, adapter, q))
        for text, adapter, q in jobs:
            alone = m.generate(text, adapter=adapter, max_new_tokens=10, ignore_eos=True).tokens
            assert _events(q) == alone, (text, adapter)
        assert engine.steps < 8 * 10, "requests shared decode steps"
    finally:
        engine.close(5)


@pytest.fixture(scope="module")
def export_abc(tiny_export, tiny_llama, tiny_data, tmp_path_factory):
    """tiny_export with a third adapter, c: rank 2 on up_proj alone (gate/up take a B per member: c's gate
    block is zeros, and its blocks are narrower than a's when stacked with them)."""
    from qlora_rt.cli import main
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    tmp = tmp_path_factory.mktemp("abc")
    out = shutil.copytree(tiny_export, tmp / "export")
    run = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), out=str(tmp / "c"),
                            quant="nf4", steps=4, rank=2, targets="up_proj", seed=2, lr=1e-2, batch_size=2,
                            seq_len=64, checkpoint_every=0, eval_every=0)).adapter
    assert main(["export-adapter", "--adapter", str(run), "--onnx", str(out), "--name", "c"]) == 0
    return out


def test_a_mixed_step_equals_single_row_runs(export_abc):
    m = Model(export_abc)
    assert {"model.layers.0.mlp.gate_proj.lora_B", "model.layers.0.mlp.up_proj.lora_B"} <= set(m.input_names)
    engine = Engine(m, max_batch=4)
    try:
        for name in "abc":
            engine.add_adapter(name, name)
        prompts = [m.encode(t) for t in PROMPTS[:4]]
        params = [{}, engine.adapters["a"], engine.adapters["b"], engine.adapters["c"]]
        singles = []
        for slot, (ids, p) in enumerate(zip(prompts, params)):  # each prompt alone, into its own slot
            singles.append(engine.rows.run(slot, np.array([ids]), np.array([len(ids)]), p)[0].copy())

        class Row:  # what _lora reads of a live request
            def __init__(self, slot, p):
                self.slot, self.params = slot, p
        lora = engine._lora([Row(i, p) for i, p in enumerate(params)], 0, 4)
        nxt = np.array([[int(s.argmax())] for s in singles])
        lengths = np.array([len(x) + 1 for x in prompts])
        mixed = engine.rows.run(0, nxt, lengths, lora)
        for i, (ids, p) in enumerate(zip(prompts, params)):
            alone = m.logits(ids + [int(nxt[i, 0])], adapter=(None, "a", "b", "c")[i])[-1]
            assert np.abs(mixed[i] - alone).max() <= 1e-4
            base = m.logits(ids + [int(nxt[i, 0])])[-1]
            assert i == 0 or np.abs(alone - base).max() > 1e-3, "each adapter changes its row's logits"
        engine._lora([Row(3 - i, p) for i, p in enumerate(params)], 0, 4)  # the same adapters, rows reordered
        assert len(engine._stacks) == 1, "a set of adapters is stacked once, whatever its rows' order"
        # two other sets: the first stack is dropped (STACKS = 2), and so is the window that last ran with it
        for pair in ((1, 2), (2, 3)):
            rows = [Row(i, params[k]) for i, k in enumerate(pair)]
            engine.rows.run(0, nxt[:2], lengths[:2], engine._lora(rows, 0, 2))
        assert len(engine._stacks) == 2 and _windows_hold_only_kept_inputs(engine)
    finally:
        engine.close(5)


def _windows_hold_only_kept_inputs(engine: Engine) -> bool:
    """Every I/O binding the engine's rows keep holds LoRA inputs of a loaded adapter, the base, a kept stack or
    a step's row masks: none of an unloaded adapter or a dropped stack (which it would keep in memory)."""
    kept = {id(v) for p in [*engine.adapters.values(), engine._base] for v in p.values()}
    kept |= {id(v) for stack in engine._stacks.values() for v in stack[0].values()}
    return all(id(v) in kept or name.endswith(".lora_mask")
               for window in engine.rows._windows.values() for name, v in window[1].items())


def _mixed_rows_decode_as_alone(engine: Engine, m: Model) -> None:
    """Adapters a and b loaded; 6 prompts over the base, a and b at once: each decodes what `generate` does."""
    for name in ("a", "b"):
        engine.add_adapter(name, name)
    jobs = []
    for i, text in enumerate(PROMPTS[:6]):
        q = queue.Queue()
        engine.submit(Request(m.encode(text), (None, "a", "b")[i % 3], max_new_tokens=6, ignore_eos=True), q.put)
        jobs.append((text, (None, "a", "b")[i % 3], q))
    for text, adapter, q in jobs:
        assert _events(q) == m.generate(text, adapter=adapter, max_new_tokens=6, ignore_eos=True).tokens


def _as_older_layout(folder: Path) -> None:
    """Rewrite an export as qlora-rt wrote them before 2026-12-07: each lora_A input (in, r), transposed inside."""
    import onnx
    from onnx import helper, numpy_helper

    from qlora_rt.runtime import manifest

    model = onnx.load(folder / "model.onnx")
    g = model.graph
    names = [i.name for i in g.input if i.name.endswith(".lora_A")]
    for node in g.node:
        node.input[:] = [f"{n}.t" if n in names else n for n in node.input]
    for name in names:
        inp = next(i for i in g.input if i.name == name)
        dims = inp.type.tensor_type.shape.dim
        first, second = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
        first.CopyFrom(dims[1]), second.CopyFrom(dims[0])
        dims[0].CopyFrom(first), dims[1].CopyFrom(second)
        init = next(t for t in g.initializer if t.name == name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).T.copy(), name))
        g.node.insert(0, helper.make_node("Transpose", [name], [f"{name}.t"], perm=[1, 0]))
    onnx.save(model, folder / "model.onnx")
    path = folder / manifest.NAME
    meta = json.loads(path.read_text())
    meta["lora_inputs"] = {k: v[::-1] if k.endswith(".lora_A") else v for k, v in meta["lora_inputs"].items()}
    path.write_text(json.dumps(meta))


def test_an_export_of_the_older_lora_layout_still_serves_mixed_adapters(tiny_llama, tiny_runs, tmp_path):
    """Exports before 2026-12-07 take lora_A as (in, r): export-adapter writes that layout for them, a file of
    the other layout is refused with the command that rewrites it, and mixed steps stack A on its own axis."""
    from qlora_rt.cli import main
    from qlora_rt.config import ExportConfig
    from qlora_rt.errors import QloraError
    from qlora_rt.export.exporter import export

    out = tmp_path / "export"
    export(ExportConfig(model=str(tiny_llama), out=str(out), quant="nf4", weights="fp32"))
    new = tmp_path / "new"
    shutil.copytree(out, new)
    assert main(["export-adapter", "--adapter", str(tiny_runs[1]["a"]), "--onnx", str(new), "--name", "a"]) == 0
    _as_older_layout(out)
    for name in ("a", "b"):
        assert main(["export-adapter", "--adapter", str(tiny_runs[1][name]), "--onnx", str(out), "--name", name]) == 0
    m = Model(out)
    a = m.load_adapter("a")["model.layers.0.self_attn.o_proj.lora_A"].shape()
    assert a[0] == 64 and a[1] < 64, a  # (in, r), as the older export takes it
    with pytest.raises(QloraError, match="laid out as adapters written for exports of another qlora-rt"):
        m.load_adapter(new / "adapters" / "a.onnx_adapter")
    engine = Engine(m, max_batch=3)
    try:
        _mixed_rows_decode_as_alone(engine, m)
        assert engine._stacks, "the rows of different adapters shared steps"
    finally:
        engine.close(5)


# ---- the API ----------------------------------------------------------------------------------------------
def test_an_export_with_one_b_per_group_still_mixes_adapters(tiny_llama, tiny_runs, tmp_path, monkeypatch):
    """Exports made before gate/up took a B per member have one block-diagonal B per group: their adapter
    files (export-adapter writes what the export takes) are stacked as such, and a mixed step is exact."""
    from qlora_rt.cli import main
    from qlora_rt.config import ExportConfig
    from qlora_rt.export import weight_writers
    from qlora_rt.export.exporter import export

    whole = weight_writers.LinearWriter._lora
    monkeypatch.setattr(weight_writers.LinearWriter, "_lora", lambda self, names, x, per_member=False:
                        whole(self, names, x, per_member=False))
    out = tmp_path / "export"
    export(ExportConfig(model=str(tiny_llama), out=str(out), quant="nf4", weights="fp32"))
    monkeypatch.undo()
    for name in ("a", "b"):
        assert main(["export-adapter", "--adapter", str(tiny_runs[1][name]), "--onnx", str(out), "--name", name]) == 0
    m = Model(out)
    assert "model.layers.0.mlp.gate_proj_up_proj.lora_B" in m.input_names
    engine = Engine(m, max_batch=3, prefill_chunk=3)
    try:
        _mixed_rows_decode_as_alone(engine, m)
    finally:
        engine.close(5)


def test_models_lists_the_base_and_each_adapter(app):
    async def go():
        async with _client(app) as c:
            r = await c.get("/v1/models")
            assert r.status_code == 200
            return [m["id"] for m in r.json()["data"]], (await c.get("/health")).json()
    ids, health = _run(go())
    assert ids == ["tiny", "a", "b"] and health["status"] == "ok"


def test_concurrent_requests_answer_as_generate_does(app, tiny_export):
    m = Model(tiny_export)

    async def go():
        async with _client(app) as c:
            async def one(i, text):
                model = ("tiny", "a", "b")[i % 3]
                r = await c.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 8,
                                                          "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return model, text, r.json()
            return await asyncio.gather(*(one(i, t) for i, t in enumerate(PROMPTS)))
    for model, text, body in _run(go()):
        alone = m.generate(text, adapter=None if model == "tiny" else model, max_new_tokens=8, ignore_eos=True)
        assert body["choices"][0]["text"] == alone.text
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] == len(m.encode(text))


def test_chat_streams_server_sent_events_ending_in_done(app, tiny_export):
    m = Model(tiny_export)
    messages = [{"role": "user", "content": "count to three"}]

    async def go():
        async with _client(app) as c:
            async with c.stream("POST", "/v1/chat/completions", json={
                    "model": "a", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                return [line async for line in r.aiter_lines() if line]
    lines = _run(go())
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    alone = m.generate(messages, adapter="a", max_new_tokens=6)
    assert text == alone.text
    assert chunks[-1]["usage"]["completion_tokens"] == len(alone.tokens)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_seed_logprobs_and_stop(app):
    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3,
                "temperature": 0.9, "seed": 7, "logprobs": True, "top_logprobs": 2})
            again = await c.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3,
                "temperature": 0.9, "seed": 7, "logprobs": True, "top_logprobs": 2})
            return r.json(), again.json()
    first, second = _run(go())
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in second["choices"]]
    assert len(first["choices"]) == 3
    lp = first["choices"][0]["logprobs"]["content"]
    assert lp and all(x["logprob"] <= 0 and len(x["top_logprobs"]) == 2 for x in lp)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "word " * 5000}, 400, "prompt"),
    ({"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "stop": [1, 2]}, 400, "stop"),
])
def test_bad_requests_get_the_openai_error_shape(app, body, status, param):
    async def go():
        async with _client(app) as c:
            return await c.post("/v1/completions", json=body)
    r = _run(go())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param)


def test_malformed_json_and_wrong_endpoints_are_400(app):
    async def go():
        async with _client(app) as c:
            bad = await c.post("/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
            no_messages = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
            role = await c.post("/v1/chat/completions",
                                json={"model": "tiny", "messages": [{"role": "x", "content": ""}]})
            classify = await c.post("/v1/classify", json={"model": "tiny", "input": ["hi"]})
            return bad, no_messages, role, classify
    for r in _run(go()):
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_a_body_past_the_limit_is_413_before_it_is_parsed(app):
    from qlora_rt.server.protocol import MAX_BODY

    async def go():
        async with _client(app) as c:
            body = b'{"model": "tiny", "prompt": "' + b"a" * MAX_BODY + b'"}'
            return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    r = _run(go())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text


def test_api_key_is_required_when_set(tiny_export):
    from qlora_rt.server.app import create_app

    app = create_app(tiny_export, api_key="sesame", max_batch=1)

    async def go():
        async with _client(app) as c:
            none = await c.get("/v1/models")
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer open"})
            right = await c.get("/v1/models", headers={"Authorization": "Bearer sesame"})
            health = await c.get("/health")
            return none, wrong, right, health
    try:
        none, wrong, right, health = _run(go())
        assert none.status_code == wrong.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
        assert right.status_code == health.status_code == 200
    finally:
        app.state.qlora.engine.close(5)


def test_a_full_queue_is_429_with_retry_after(tiny_export):
    from qlora_rt.server.app import create_app

    app = create_app(tiny_export, max_batch=1, max_queue=0, served_model_name="tiny")
    engine = app.state.qlora.engine
    run = engine.rows.run
    engine.rows.run = lambda *a: (time.sleep(0.02), run(*a))[1]  # a slow model: 40 steps take 0.8 s

    async def go():
        async with _client(app) as c:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 40, "ignore_eos": True}
            first = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while engine.load[0] == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/completions", json=body)
            return await first, second
    try:
        first, second = _run(go())
        assert first.status_code == 200
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.close(5)


def test_adapters_load_only_from_inside_the_export_or_adapters_dir(tiny_export, tmp_path):
    from qlora_rt.server.app import create_app

    outside = tmp_path / "outside.onnx_adapter"
    shutil.copy(tiny_export / "adapters" / "a.onnx_adapter", outside)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tiny_export / "adapters" / "b.onnx_adapter", allowed / "b2.onnx_adapter")
    (allowed / "link.onnx_adapter").symlink_to(outside)
    app = create_app(tiny_export, adapters_dir=allowed, max_batch=2, served_model_name="tiny")

    async def go():
        async with _client(app) as c:
            post = lambda url, body: c.post(url, json=body)  # noqa: E731
            out = [await post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(outside)}),
                   await post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../outside.onnx_adapter"}),
                   await post("/v1/load_lora_adapter", {"lora_name": "x",
                                                        "lora_path": str(allowed / "link.onnx_adapter")}),
                   await post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc/passwd"}),
                   await post("/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": "b2.onnx_adapter"})]
            models = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            used = await post("/v1/completions", {"model": "b2", "prompt": "hi", "max_tokens": 3})
            gone = await post("/v1/unload_lora_adapter", {"lora_name": "b2"})
            after = await post("/v1/completions", {"model": "b2", "prompt": "hi", "max_tokens": 3})
            again = await post("/v1/unload_lora_adapter", {"lora_name": "b2"})
            return out, models, used, gone, after, again
    try:
        out, models, used, gone, after, again = _run(go())
        assert [r.status_code for r in out] == [400, 400, 400, 400, 200]
        assert all(r.json()["error"]["code"] == "path_not_allowed" for r in out[:4])
        assert "b2" in models and used.status_code == 200 and gone.status_code == 200
        assert after.status_code == 404 and again.status_code == 404
    finally:
        app.state.qlora.engine.close(5)


def test_unloaded_adapters_leave_the_engine_whole(tiny_export, tmp_path):
    """20 copies of an adapter loaded, used by one request each and unloaded: the engine then holds none of them,
    not in the prefix cache's free slots (whose cached tokens were computed with one), not in its stacks, not in
    its rows' I/O bindings."""
    import shutil

    from qlora_rt.server.app import create_app

    folder = tmp_path / "adapters"
    folder.mkdir()
    for i in range(20):
        shutil.copy(tiny_export / "adapters" / "b.onnx_adapter", folder / f"c{i}.onnx_adapter")
    app = create_app(tiny_export, adapters_dir=folder, max_batch=4, served_model_name="tiny")
    engine = app.state.qlora.engine

    async def go():
        async with _client(app) as c:
            for i in range(20):
                loaded = await c.post("/v1/load_lora_adapter", json={"lora_name": f"c{i}",
                                                                      "lora_path": f"c{i}.onnx_adapter"})
                r = await c.post("/v1/completions", json={"model": f"c{i}", "prompt": f"{i} one", "max_tokens": 2})
                assert loaded.status_code == r.status_code == 200
                while engine.load != (0, 0):
                    await asyncio.sleep(0.01)
                assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": f"c{i}"})).status_code == 200
            # a request on a loaded one after, so the engine's loop has run since the last unload
            assert (await c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})).status_code \
                == 200
    try:
        _run(go())
        with engine.cond:
            kept = {id(v) for v in engine.adapters.values()} | {id(engine._base)}
            held = [p for p, _ in engine.held if p is not None]
            assert all(id(p) in kept for p in held), "a free slot still holds an unloaded adapter"
            assert all(i in kept for key in engine._stacks for i in key)
            assert set(engine.adapters) == {"a", "b"}
            assert _windows_hold_only_kept_inputs(engine), "a row's I/O binding still holds an unloaded adapter"
    finally:
        engine.close(5)


def test_unloading_an_adapter_in_use_lets_its_running_request_finish(tiny_export):
    """The stream on `b` started before the unload decodes to the end, the tokens it decodes alone; a request
    after it gets 404."""
    from qlora_rt.server.app import create_app

    app = create_app(tiny_export, max_batch=2, served_model_name="tiny")
    m = Model(tiny_export)

    async def go():
        async with _client(app) as c:
            body = {"model": "b", "prompt": "count to three", "max_tokens": 30, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            tokens, unloaded = [], None
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    tokens.append(json.loads(line[6:]))
                    if unloaded is None:
                        unloaded = await c.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
            after = await c.post("/v1/completions", json={**body, "stream": False})
            return tokens, unloaded, after
    try:
        chunks, unloaded, after = _run(go())
    finally:
        app.state.qlora.engine.close(5)
    assert unloaded.status_code == 200 and after.status_code == 404
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text == m.generate("count to three", adapter="b", max_new_tokens=30, ignore_eos=True).text


def test_an_adapter_for_another_base_is_refused_on_load(tiny_export, tmp_path):
    from qlora_rt.server.app import create_app

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "junk.onnx_adapter").write_bytes(b"not a flatbuffer")
    app = create_app(tiny_export, adapters_dir=allowed, max_batch=1)

    async def go():
        async with _client(app) as c:
            return await c.post("/v1/load_lora_adapter", json={"lora_name": "j", "lora_path": "junk.onnx_adapter"})
    try:
        r = _run(go())
        assert r.status_code == 400 and "not a readable .onnx_adapter" in r.json()["error"]["message"]
    finally:
        app.state.qlora.engine.close(5)


def test_64_concurrent_mixed_requests_all_complete(app):
    async def go():
        async with _client(app) as c:
            async def one(i):
                body = {"model": ("tiny", "a", "b")[i % 3], "max_tokens": 4 + i % 5, "temperature": 0,
                        "stream": i % 2 == 0}
                if i % 4 < 2:
                    body["prompt"] = PROMPTS[i % 8]
                    url = "/v1/completions"
                else:
                    body["messages"] = [{"role": "user", "content": PROMPTS[i % 8]}]
                    url = "/v1/chat/completions"
                if body["stream"]:
                    async with c.stream("POST", url, json=body) as r:
                        lines = [line async for line in r.aiter_lines() if line]
                        return r.status_code, lines[-1] == "data: [DONE]"
                r = await c.post(url, json=body)
                return r.status_code, r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return await asyncio.gather(*(one(i) for i in range(64)))
    results = _run(go())
    assert all(status == 200 and ok for status, ok in results), results
    deadline = time.time() + 5  # the replies can arrive before the engine's thread frees the rows
    while app.state.qlora.engine.load != (0, 0) and time.time() < deadline:
        time.sleep(0.01)
    assert app.state.qlora.engine.load == (0, 0)


def test_a_client_that_disconnects_frees_its_row(tiny_export):
    engine, port, stop = _serve_in_thread(tiny_export)
    run = engine.rows.run
    engine.rows.run = lambda *a: (time.sleep(0.02), run(*a))[1]  # a slow model: 200 steps take 4 s
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 200,
                                                          "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_lines())
                assert engine.load[0] == 1
        deadline = time.time() + 3
        while engine.load != (0, 0) and time.time() < deadline:
            time.sleep(0.02)
        assert engine.load == (0, 0) and engine.steps < 150
    finally:
        stop()


def test_the_official_openai_client_talks_to_it(tiny_export):
    openai = pytest.importorskip("openai")
    engine, port, stop = _serve_in_thread(tiny_export)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == ["base", "a", "b"]
        reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "count"}],
                                               max_tokens=5, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "count"}], max_tokens=5, temperature=0, stream=True)
            if c.choices]
        assert "".join(pieces) == reply.choices[0].message.content
        done = client.completions.create(model="b", prompt=["one two", "three"], max_tokens=3, temperature=0)
        assert len(done.choices) == 2
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="c", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], temperature=-1)
    finally:
        stop()


def _serve_in_thread(folder):
    """A real uvicorn server over the export on a free port, in a thread: (engine, port, stop)."""
    from conftest import serve_in_thread

    from qlora_rt.server.app import create_app

    app = create_app(folder, max_batch=2, served_model_name="base")
    return (app.state.qlora.engine, *serve_in_thread(app))


def test_classify_endpoint_on_an_encoder_export(encoder_export):
    from qlora_rt.runtime.classifier import Classifier
    from qlora_rt.server.app import create_app

    app = create_app(encoder_export)

    async def go():
        async with _client(app) as c:
            ok = await c.post("/v1/classify", json={"model": "sentiment", "input": ["good great", "awful poor"]})
            base = await c.get("/v1/models")
            chat = await c.post("/v1/chat/completions", json={"model": "sentiment",
                                                              "messages": [{"role": "user", "content": "x"}]})
            empty = await c.post("/v1/classify", json={"model": "sentiment", "input": [""]})
            return ok, base, chat, empty
    ok, base, chat, empty = _run(go())
    assert ok.status_code == 200
    want = Classifier(encoder_export).classify(["good great", "awful poor"], adapter="sentiment")
    got = ok.json()["data"]
    assert [d["label"] for d in got] == [p.label for p in want]
    assert all(abs(sum(d["probs"].values()) - 1) < 1e-5 for d in got)
    assert "sentiment" in [m["id"] for m in base.json()["data"]]
    assert chat.status_code == 400 and empty.status_code == 400


def test_serve_help_and_a_missing_folder(capsys):
    from qlora_rt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    assert main(["serve", "/nonexistent/export"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_sampling_matches_between_engine_and_generate_with_a_seed(tiny_export):
    m = Model(tiny_export)
    engine = Engine(m, max_batch=2)
    try:
        q = queue.Queue()
        engine.submit(Request(m.encode("count"), None, 8, Sampling(0.8, 20, 0.9, 3), ignore_eos=True), q.put)
        alone = m.generate("count", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
        assert _events(q) == alone.tokens
    finally:
        engine.close(5)


def test_response_format_json_schema_constrains_the_reply(app):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"enum": [1, 2, 3]}},
              "required": ["answer", "n"], "additionalProperties": False}

    async def go():
        async with _client(app) as c:
            out = []
            for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                        {"type": "json_object"}):
                out.append(await c.post("/v1/chat/completions", json={
                    "model": "a", "messages": [{"role": "user", "content": "count"}], "max_tokens": 60,
                    "temperature": 0.7, "seed": 1, "response_format": fmt}))
            out.append(await c.post("/v1/chat/completions", json={
                "model": "a", "messages": [{"role": "user", "content": "count"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}))
            return out
    with_schema, any_object, broken = _run(go())
    choice = with_schema.json()["choices"][0]
    reply = json.loads(choice["message"]["content"])  # a random tiny model, but the grammar holds it
    assert choice["finish_reason"] == "stop" and reply["answer"] in ("yes", "no") and isinstance(reply["n"], int)
    assert set(reply) == {"answer", "n"}
    assert choice["message"]["content"] == json.dumps(reply)  # laid out as json.dumps: no runs of whitespace
    text = any_object.json()["choices"][0]["message"]["content"]
    assert text.startswith("{")
    if any_object.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "response_format"


def test_completions_take_response_format_too(app):
    """vLLM's /v1/completions takes response_format; a request that asks for JSON never gets free text."""
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}

    async def go():
        async with _client(app) as c:
            good = await c.post("/v1/completions", json={
                "model": "b", "prompt": "count", "max_tokens": 60, "temperature": 0.7, "seed": 1,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
            missing = await c.post("/v1/completions", json={
                "model": "b", "prompt": "count", "response_format": {"type": "json_schema"}})
            return good, missing
    good, missing = _run(go())
    choice = good.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["text"])["ok"], bool)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "response_format"
    assert "json_schema: required" in missing.json()["error"]["message"]


@pytest.mark.parametrize("extra,param,says", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "only text parts are supported; got a 'image_url' part"),
])
def test_chat_features_it_lacks_are_refused_not_ignored(app, extra, param, says):
    async def go():
        async with _client(app) as c:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
            return await c.post("/v1/chat/completions", json=body)
    r = _run(go())
    assert r.status_code == 400 and r.json()["error"]["param"] == param and says in r.json()["error"]["message"]


def test_penalties_and_logit_bias_apply_as_generate_applies_them(app, tiny_export):
    """OpenAI's sampling adjustments: a +100 bias makes greedy decoding repeat its token; a frequency
    penalty of 2 changes a greedy reply, the same way in the server and in Model.generate; out of range: 400."""
    m = Model(tiny_export)
    forced = m.encode(" the")[-1]

    async def go():
        async with _client(app) as c:
            post = lambda body: c.post("/v1/completions", json={"model": "a", "prompt": "count to three",  # noqa: E731
                                                                "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                                                **body})
            return [await post(b) for b in ({"logit_bias": {str(forced): 100}}, {"frequency_penalty": 2.0},
                                             {}, {"logit_bias": {"x": 1}}, {"logit_bias": {"-1": 1}},
                                             {"presence_penalty": 2.5})]
    biased, penalized, plain, *bad = _run(go())
    assert biased.json()["choices"][0]["text"] == m.tokenizer.decode([forced] * 12)
    alone = m.generate("count to three", adapter="a", max_new_tokens=12, ignore_eos=True, frequency_penalty=2.0)
    assert penalized.json()["choices"][0]["text"] == alone.text != plain.json()["choices"][0]["text"]
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert [r.json()["error"]["param"] for r in bad] == ["logit_bias", "logit_bias", "presence_penalty"]


def test_a_merged_export_batches_its_requests(merged_export):
    m = Model(merged_export)
    engine = Engine(m, max_batch=4)
    try:
        jobs = []
        for text in PROMPTS[:4]:
            q = queue.Queue()
            engine.submit(Request(m.encode(text), None, 6, ignore_eos=True), q.put)
            jobs.append((text, q))
        for text, q in jobs:
            assert _events(q) == m.generate(text, max_new_tokens=6, ignore_eos=True).tokens
        assert engine.steps < 4 * 6, "the base's rows shared steps"
    finally:
        engine.close(5)


def test_streamed_usage_counts_each_prompt_once(app, tiny_export):
    m = Model(tiny_export)

    async def go():
        async with _client(app) as c:
            async with c.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": ["one two", "three four five"], "n": 2, "max_tokens": 3,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
                return [line async for line in r.aiter_lines() if line]
    lines = _run(go())
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["prompt_tokens"] == len(m.encode("one two")) + len(m.encode("three four five"))
    assert usage["completion_tokens"] == 4 * 3


def test_metrics_in_prometheus_text_format(tiny_export):
    from prometheus_client.parser import text_string_to_metric_families

    from qlora_rt.server.app import create_app

    app = create_app(tiny_export, max_batch=2, served_model_name="tiny")

    async def go():
        async with _client(app) as c:
            ok = await c.post("/v1/completions", json={"model": "a", "prompt": "the cat " * 40, "max_tokens": 3,
                                                        "ignore_eos": True})
            missing = await c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            for i in range(5):  # names a client makes up never become labels: /metrics stays small
                await c.post("/v1/completions", json={"model": f"{i}" * (1 << 20), "prompt": "x"})
            again = await c.post("/v1/completions", json={"model": "a", "prompt": "the cat " * 40, "max_tokens": 3,
                                                           "ignore_eos": True})
            engine = app.state.qlora.engine
            while engine.load != (0, 0):  # the reply can arrive before the engine's thread frees the row
                await asyncio.sleep(0.01)
            return ok, missing, again, await c.get("/metrics")
    try:
        ok, missing, again, r = _run(go())
        assert ok.status_code == again.status_code == 200 and missing.status_code == 404
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(r.text) for s in f.samples}
        assert samples[("qlora_rt_requests_total", (("model", "a"), ("status", "200")))] == 2
        assert samples[("qlora_rt_requests_total", (("model", "unknown"), ("status", "404")))] == 6
        assert len(r.content) < 64 << 10 and "nope" not in r.text
        prompt = ok.json()["usage"]["prompt_tokens"]
        assert samples[("qlora_rt_prompt_tokens_total", (("model", "a"),))] == 2 * prompt
        assert samples[("qlora_rt_generation_tokens_total", (("model", "a"),))] == 6
        chunk = PREFILL_CHUNK  # the second took the first's whole prompt chunks, and ran the rest
        assert samples[("qlora_rt_prefix_cache_tokens_total", ())] == (prompt - 1) // chunk * chunk > 0
        assert samples[("qlora_rt_time_to_first_token_seconds_count", (("model", "a"),))] == 2
        assert samples[("qlora_rt_step_seconds_count", ())] >= 4
        assert samples[("qlora_rt_adapters_loaded", ())] == 2
        assert samples[("qlora_rt_rows_running", ())] == samples[("qlora_rt_rows_waiting", ())] == 0
    finally:
        app.state.qlora.engine.close(5)
