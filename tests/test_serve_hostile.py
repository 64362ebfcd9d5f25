"""`qlora-rt serve` against careless and hostile clients, and one tenant beside another (docs/serving.md,
"What the server guarantees"): memory bounded by configuration, a row's output independent of other rows,
unload frees and a changed file is re-read, no 500 from any request body, a clean end on shutdown."""

import asyncio
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from conftest import serve_in_thread

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from qlora_rt.runtime import Model  # noqa: E402
from qlora_rt.runtime.batching import Engine, Request  # noqa: E402


def _client(app, **kw):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=60, **kw)


def _run(coro):
    return asyncio.run(coro)


def _app(folder, **kw):
    from qlora_rt.server.app import create_app

    return create_app(folder, served_model_name="tiny", **{"max_batch": 2, **kw})


def _slow(engine, seconds=0.02):
    run = engine.rows.run
    engine.rows.run = lambda *a: (time.sleep(seconds), run(*a))[1]


def _write_adapter(src, dst, change):
    """A copy of an .onnx_adapter file with its arrays changed by change(name, array) -> array."""
    fmt = ort.AdapterFormat.read_adapter(str(src))
    params = {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
    out = ort.AdapterFormat()
    out.set_adapter_version(fmt.get_adapter_version())
    out.set_model_version(fmt.get_model_version())
    arrays = {k: np.ascontiguousarray(change(k, v)) for k, v in params.items()}  # alive until written
    out.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()})
    out.export_adapter(str(dst))
    return dst


# ---- memory bounded by configuration --------------------------------------------------------------------
def test_a_chunked_body_is_counted_as_it_arrives_and_refused_at_the_limit(tiny_export):
    """No Content-Length: the body is refused once it passes --max-body-mb, never read whole."""
    app = _app(tiny_export, max_body=1 << 20)
    port, stop = serve_in_thread(app)
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"a" * 65536
            reply = b""
            with pytest.raises(OSError):  # the server answers and closes long before 64 MiB
                for _ in range(1024):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            s.settimeout(5)
            try:
                reply = s.recv(65536)
            except OSError:
                pass
        assert sent < 8 << 20, sent
        if reply:  # the 413 arrived before the reset
            assert b" 413 " in reply.split(b"\r\n")[0] and b"body_too_large" in reply, reply[:300]
    finally:
        stop()
        app.state.qlora.engine.close(5)


def test_a_chunked_body_under_the_limit_is_served(tiny_export):
    app = _app(tiny_export)

    async def body():
        yield b'{"model": "tiny", "prompt": "hello", '
        yield b'"max_tokens": 3}'

    async def go():
        async with _client(app) as c:
            return await c.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    try:
        r = _run(go())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        app.state.qlora.engine.close(5)


def test_a_prompt_too_long_for_any_context_is_refused_before_it_is_tokenized(tiny_export):
    app = _app(tiny_export)
    state = app.state.qlora
    encode = state.model.tokenizer.encode
    tokenized = []
    state.model.tokenizer = type("T", (), {"encode": lambda self, t, *a, **k: tokenized.append(len(t)) or encode(t)})()
    text = "word " * 1_000_000

    async def go():
        async with _client(app) as c:
            plain = await c.post("/v1/completions", json={"model": "tiny", "prompt": text})
            chat = await c.post("/v1/chat/completions", json={"model": "tiny",
                                                               "messages": [{"role": "user", "content": text}]})
            return plain, chat
    try:
        plain, chat = _run(go())
        for r, field in ((plain, "prompt"), (chat, "messages")):
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == field, r.text
        assert not tokenized  # refused by its length in characters alone
    finally:
        state.model.tokenizer = encode.__self__
        state.engine.close(5)


def test_the_queue_is_bounded_in_rows_not_requests(tiny_export):
    """prompts x n are rows: a request never takes more than the queue's room, and one that could never fit
    is a 400 saying so; when its client leaves, its rows leave with it."""
    app = _app(tiny_export, max_batch=1, max_queue=2)
    engine = app.state.qlora.engine
    _slow(engine)

    async def go():
        async with _client(app) as c:
            never = await c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 2})
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 30, "ignore_eos": True}
            first = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while engine.load[0] == 0:
                await asyncio.sleep(0.01)
            three = await c.post("/v1/completions", json={**body, "n": 3})
            two = await c.post("/v1/completions", json={**body, "n": 2, "max_tokens": 2})
            return never, three, two, await first
    try:
        never, three, two, first = _run(go())
        assert never.status_code == 400 and "at most 3 at once" in never.json()["error"]["message"], never.text
        assert three.status_code == 429 and "this request needs 3" in three.json()["error"]["message"], three.text
        assert two.status_code == first.status_code == 200, two.text
        deadline = time.time() + 5  # the replies can arrive before the engine's thread frees the rows
        while engine.load != (0, 0) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.load == (0, 0)
    finally:
        engine.close(5)


def test_a_non_streaming_request_stops_decoding_when_its_client_leaves(tiny_export):
    app = _app(tiny_export, max_batch=2, max_seq_len=4096)
    engine = app.state.qlora.engine
    _slow(engine, 0.01)
    port, stop = serve_in_thread(app)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": engine.capacity - 8,
                               "ignore_eos": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 10
            while engine.load[0] == 0 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.load[0] == 1
        started = engine.steps
        deadline = time.time() + 5
        while engine.load != (0, 0) and time.time() < deadline:
            time.sleep(0.02)
        assert engine.load == (0, 0) and engine.steps - started < engine.capacity // 2, engine.steps - started
    finally:
        stop()
        engine.close(5)


# ---- a row's output independent of other rows ------------------------------------------------------------
def test_an_adapter_with_values_past_fp16s_range_is_refused_at_load(tiny_export, tmp_path):
    from qlora_rt.errors import QloraError

    src = tiny_export / "adapters" / "a.onnx_adapter"
    m = Model(tiny_export)
    for value in (3e38, 1e5):
        def huge(k, v, value=value):
            if k.endswith(".lora_A"):
                v = v.copy()
                v.flat[0] = value
            return v
        bad = _write_adapter(src, tmp_path / f"huge{value:g}.onnx_adapter", huge)
        with pytest.raises(QloraError, match="within ±65504"):
            m.load_adapter(bad)
    app = _app(tiny_export, adapters_dir=tmp_path)

    async def go():
        async with _client(app) as c:
            return await c.post("/v1/load_lora_adapter", json={"lora_name": "huge", "lora_path": str(bad)})
    try:
        r = _run(go())
        assert r.status_code == 400 and "within ±65504" in r.json()["error"]["message"], r.text
    finally:
        app.state.qlora.engine.close(5)


def test_a_wild_adapter_in_the_step_leaves_the_other_rows_exactly_as_alone(tiny_export, tmp_path):
    """An adapter at the edge of what loads (every A value 6e4): the base's and another adapter's rows beside
    it decode exactly their lone tokens; its own row ends on its own (tokens, or an error event if its
    scores overflow)."""
    wild = _write_adapter(tiny_export / "adapters" / "a.onnx_adapter", tmp_path / "wild.onnx_adapter",
                          lambda k, v: np.full_like(v, 6e4) if k.endswith(".lora_A") else v)
    m = Model(tiny_export)
    prompt = m.encode("the cat sat on")
    alone = {name: m.generate_ids([prompt], adapter=name, max_new_tokens=8, ignore_eos=True)[0].tokens
             for name in (None, "b")}
    engine = Engine(m, max_batch=3)
    try:
        engine.add_adapter("b", "b")
        engine.add_adapter("wild", wild)
        events = {name: [] for name in (None, "b", "wild")}
        done = threading.Event()
        finished = []

        def emit(name):
            def f(ev):
                events[name].append(ev)
                if ev.finish:
                    finished.append(name)
                    if len(finished) == 3:
                        done.set()
            return f
        engine.submit_many([Request(prompt, name, 8, ignore_eos=True) for name in events],
                           [emit(name) for name in events])
        assert done.wait(60)
        for name in (None, "b"):
            tokens = [t for ev in events[name] for t in ev.tokens]
            assert events[name][-1].finish == "length" and tokens == alone[name], name
        assert events["wild"][-1].finish in ("length", "error")
    finally:
        engine.close(5)


def test_a_row_whose_scores_are_not_finite_ends_with_an_error_of_its_own(tiny_export):
    m = Model(tiny_export)
    engine = Engine(m, max_batch=1)
    got = []
    try:
        live = engine.submit(Request(m.encode("hi"), None, 4), got.append)
        engine._take(live, np.full(m.meta.vocab, np.nan, np.float32))
        assert got[-1].finish == "error" and "not finite" in got[-1].error
    finally:
        engine.close(5)


# ---- adapters resident: unload frees, a changed file is re-read, a huge file is refused at once -----------
def test_unload_frees_and_loading_a_changed_file_reads_it_again(tiny_export, tmp_path):
    app = _app(tiny_export, adapters_dir=tmp_path, max_batch=3)
    state = app.state.qlora
    engine, m = state.engine, state.model
    path = tmp_path / "x.onnx_adapter"
    shutil.copy(tiny_export / "adapters" / "a.onnx_adapter", path)
    body = {"model": "x", "prompt": "the cat sat on", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    base = {**body, "model": "tiny"}

    async def go():
        async with _client(app) as c:
            load = lambda: c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})  # noqa: E731
            unload = lambda: c.post("/v1/unload_lora_adapter", json={"lora_name": "x"})  # noqa: E731
            assert (await load()).status_code == 200
            # a mixed step (base + x) stacks x beside the base's rows
            first, _ = await asyncio.gather(c.post("/v1/completions", json=body), c.post("/v1/completions", json=base))
            assert (await unload()).status_code == 200
            shutil.copy(tiny_export / "adapters" / "b.onnx_adapter", path)  # the file changes
            assert (await load()).status_code == 200
            second = await c.post("/v1/completions", json=body)
            assert (await unload()).status_code == 200
            return first.json(), second.json()
    try:
        first, second = _run(go())
        want = {name: m.generate_ids([m.encode("the cat sat on")], adapter=name, max_new_tokens=6,
                                     ignore_eos=True)[0].text for name in ("a", "b")}
        assert first["choices"][0]["text"] == want["a"] and second["choices"][0]["text"] == want["b"]
        deadline = time.time() + 5
        while engine._stacks and time.time() < deadline:
            engine.cancel(engine.submit(Request(m.encode("hi"), None, 1), lambda ev: None))  # a loop turn
            time.sleep(0.05)
        assert not engine._stacks and not engine.adapters.keys() - {"a", "b"}
        assert not any(p.name == "x.onnx_adapter" for p in m._adapters)  # the server's reads are not cached
    finally:
        engine.close(5)


def test_a_huge_file_is_refused_before_it_is_read(tiny_export, tmp_path):
    from qlora_rt.errors import QloraError

    sparse = tmp_path / "sparse.onnx_adapter"
    with open(sparse, "wb") as f:
        f.truncate(5 << 30)  # 5 GiB, no blocks on disk
    t0 = time.perf_counter()
    with pytest.raises(QloraError, match="an adapter of this export is at most"):
        Model(tiny_export).load_adapter(sparse)
    assert time.perf_counter() - t0 < 5


# ---- no 500 from any request body ------------------------------------------------------------------------
def test_lone_surrogates_and_a_nul_in_a_path_are_400s(tiny_export):
    app = _app(tiny_export)
    raw = {"content-type": "application/json"}

    async def go():
        async with _client(app) as c:
            return [
                await c.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a \\ud800 b"}', headers=raw),
                await c.post("/v1/chat/completions", headers=raw, content=b'{"model": "tiny", "messages": '
                             b'[{"role": "user", "content": "\\udfff"}]}'),
                await c.post("/v1/completions", headers=raw,
                             content=b'{"model": "tiny", "prompt": "a", "stop": ["\\ud83d"]}'),
                await c.post("/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "a\x00b.onnx_adapter"}),
            ]
    try:
        for r in _run(go()):
            assert r.status_code == 400 and "error" in r.json(), r.text
    finally:
        app.state.qlora.engine.close(5)


def test_echo_is_honoured_and_best_of_and_suffix_are_refused_by_name(tiny_export):
    app = _app(tiny_export)
    body = {"model": "tiny", "prompt": "the cat sat on", "max_tokens": 4, "temperature": 0}

    async def go():
        async with _client(app) as c:
            plain = await c.post("/v1/completions", json=body)
            echoed = await c.post("/v1/completions", json={**body, "echo": True})
            async with c.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as s:
                pieces = [json.loads(line[6:])["choices"][0]["text"] async for line in s.aiter_lines()
                          if line.startswith("data: {")]
            refused = [await c.post("/v1/completions", json={**body, **extra})
                       for extra in ({"best_of": 3}, {"suffix": "end"}, {"echo": True, "logprobs": 2})]
            same = await c.post("/v1/completions", json={**body, "best_of": 1})
            return plain.json(), echoed.json(), "".join(pieces), refused, same
    try:
        plain, echoed, streamed, refused, same = _run(go())
        text = plain["choices"][0]["text"]
        assert echoed["choices"][0]["text"] == "the cat sat on" + text == streamed
        for r, field in zip(refused, ("best_of", "suffix", "echo")):
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert same.status_code == 200
    finally:
        app.state.qlora.engine.close(5)


# ---- the key, the Host, the schema pages ------------------------------------------------------------------
def test_the_key_covers_the_schema_pages_and_the_host_must_be_this_machines(tiny_export):
    app = _app(tiny_export, api_key="sesame", allowed_hosts=("127.0.0.1", "localhost", "::1"))
    key = {"Authorization": "Bearer sesame"}

    async def go():
        async with _client(app) as c:
            pages = [await c.get(p) for p in ("/docs", "/redoc", "/openapi.json")]
            keyed = await c.get("/openapi.json", headers=key)
            rebound = await c.get("/v1/models", headers={**key, "Host": "evil.example:8000"})
            local = [await c.get("/v1/models", headers={**key, "Host": h}) for h in ("localhost:8000", "[::1]:80")]
            health = await c.get("/health", headers={"Host": "evil.example"})
            return pages, keyed, rebound, local, health
    try:
        pages, keyed, rebound, local, health = _run(go())
        assert all(p.status_code == 401 for p in pages) and keyed.status_code == 200
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
        assert all(r.status_code == 200 for r in local) and health.status_code == 400
    finally:
        app.state.qlora.engine.close(5)


def test_the_key_can_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from qlora_rt.config import ServeConfig
    from qlora_rt.errors import QloraError

    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv("QLORA_RT_API_KEY", "from-env")
    assert ServeConfig(folder="x", api_key_file=str(tmp_path / "key")).key() == "from-file"
    assert ServeConfig(folder="x").key() == "from-env"
    assert ServeConfig(folder="x", api_key="given").key() == "given"
    (tmp_path / "empty").write_text("")
    with pytest.raises(QloraError, match="is empty"):
        ServeConfig(folder="x", api_key_file=str(tmp_path / "empty")).key()
    monkeypatch.delenv("QLORA_RT_API_KEY")
    assert ServeConfig(folder="x").key() is None
    assert ServeConfig(folder="x").hosts() == ("127.0.0.1", "localhost", "::1")
    assert ServeConfig(folder="x", host="0.0.0.0").hosts() is None
    assert os.environ.get("QLORA_RT_API_KEY") is None


# ---- shutdown -----------------------------------------------------------------------------------------------
def test_shutdown_ends_running_streams_with_an_error_event_and_done(tiny_export):
    """What SIGTERM does (`serve` closes the engine with a grace period): a stream still running when it ends
    gets an error event and [DONE], a waiting request a 503, and new requests a 503."""
    app = _app(tiny_export, max_batch=1, max_seq_len=4096)
    engine = app.state.qlora.engine
    _slow(engine, 0.01)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": engine.capacity - 8, "ignore_eos": True}

    async def go():
        async with _client(app) as c:
            async def stream():
                async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                    return [line async for line in s.aiter_lines() if line.startswith("data: ")]
            running = asyncio.ensure_future(stream())
            while engine.load[0] == 0:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(c.post("/v1/completions", json={**body, "max_tokens": 2}))
            while engine.load[1] == 0:
                await asyncio.sleep(0.01)
            closer = asyncio.get_running_loop().run_in_executor(None, engine.close, 0.3)
            lines, late = await running, await waiting
            await closer
            after = await c.post("/v1/completions", json=body)
            return lines, late, after
    lines, late, after = _run(go())
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "shutting_down", lines[-3:]
    assert late.status_code == after.status_code == 503, (late.text, after.text)
