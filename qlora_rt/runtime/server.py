"""`qlora-rt serve`: an OpenAI-compatible HTTP server over an export, where each request picks its adapter.

Endpoints (docs/serving.md): GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(decoder exports), POST /v1/classify (encoder exports), POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's names). The model name of a request is the base's served name or an
adapter's name. Every error has the OpenAI shape {"error": {"message", "type", "param", "code"}} and a 4xx
status; a request the model fails on gets a 500 in the same shape.

Decoder requests go to the continuous-batching engine (runtime/batching.py), which runs in its own thread;
the event loop only parses, tokenizes (in a worker thread) and streams.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_rt.errors import QloraError
from qlora_rt.runtime import manifest
from qlora_rt.runtime.batching import Engine, Event, QueueFull
from qlora_rt.runtime.batching import Request as EngineRequest
from qlora_rt.runtime.constrained import Grammars, schema_of
from qlora_rt.runtime.decoder import Sampling, _stops
from qlora_rt.runtime.session import ADAPTER_SUFFIX, adapter_names


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


MAX_BODY = 32 << 20  # bytes of a request body (by its Content-Length)


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---- request bodies (unknown fields are accepted and ignored, as OpenAI's own server does) --------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Sampled(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)               # an extra field, as vLLM takes it (0 or -1: off)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False                  # an extra field (vLLM's): decode max_tokens exactly (benchmarks)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) -> bias in [-100, 100]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"only text parts are supported; got a {kind!r} part")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatBody(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class CompletionBody(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    response_format: ResponseFormat | None = None  # an extra field here, as vLLM takes it


class ClassifyBody(_Body):
    model: str
    input: str | list[str]


class LoadAdapter(_Body):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    lora_path: str = Field(min_length=1)


class UnloadAdapter(_Body):
    lora_name: str = Field(min_length=1)


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(folder: str | Path, *, api_key: str | None = None, max_batch: int = 8, threads: int = 0,
               adapters_dir: str | Path | None = None, served_model_name: str | None = None,
               max_seq_len: int = 2048, max_queue: int | None = None) -> FastAPI:
    """The server's app for one export folder (uvicorn runs it; tests call it in-process)."""
    folder = Path(folder)
    meta = manifest.read(folder)
    base_name = served_model_name or _default_name(meta.base_model)
    roots = [folder.resolve()] + ([Path(adapters_dir).resolve()] if adapters_dir else [])
    state: dict[str, Any] = {"adapters": {}}
    created = int(time.time())

    if meta.family == "decoder":
        from qlora_rt.runtime.decoder import Model

        model = Model(folder, threads, verb="serve")
        engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len,
                        max_queue=max_queue if max_queue is not None else 4 * max_batch)
        state["engine"], state["model"] = engine, model
        state["grammars"] = Grammars(folder, model.meta.vocab, sorted(model.eos))
    else:
        from qlora_rt.runtime.classifier import Classifier

        clf = Classifier(folder, threads)
        state["classifier"] = clf
    if meta.mode == "adapter-aware":
        for name in adapter_names(folder):
            _load(state, name, folder / "adapters" / f"{name}{ADAPTER_SUFFIX}")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        if "engine" in state:  # uvicorn has let the running responses finish (or given up on them)
            await run_in_threadpool(state["engine"].close, 5.0)

    app = FastAPI(title="qlora-rt", lifespan=lifespan)
    app.state.qlora = state

    # ---- errors in the OpenAI shape -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('msg')})", None, "invalid_json")
        return _error(400, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), None, None,
                      "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug of ours: still the API's shape, and one line
        return _error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      None, None, "server_error")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):  # added first: runs after auth
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY:
            return _error(413, f"the body is {size} bytes; this server takes at most {MAX_BODY >> 20} MiB "
                               "(a prompt longer than any context fits in far less)", None, "body_too_large")
        return await call_next(request)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                              "invalid_api_key", "authentication_error")
        return await call_next(request)

    def resolve_model(name: str) -> str | None:
        """The adapter a model name picks (None = the base), or 404."""
        if name == base_name:
            return None
        if name in state["adapters"]:
            return name
        raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists them ({base_name} and its "
                            "adapters)", "model", "model_not_found", "not_found_error")

    # ---- endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        out = {"status": "ok"}
        if "engine" in state:
            out["running"], out["waiting"] = state["engine"].load
        return out

    @app.get("/v1/models")
    async def models():
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "qlora-rt",
                 "root": str(meta.base_model), "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "qlora-rt", "root": base_name,
                  "parent": base_name} for n in sorted(state["adapters"])]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter):
        if meta.mode != "adapter-aware":
            raise APIError(400, f"{folder} is a merged export; it takes no adapters", "lora_path")
        if body.lora_name in state["adapters"] or body.lora_name == base_name:
            raise APIError(400, f"a model named {body.lora_name!r} is already served; unload it first", "lora_name")
        path = Path(body.lora_path)
        path = (path if path.is_absolute() else roots[-1] / path).resolve()
        if not any(path.is_relative_to(r) for r in roots):
            raise APIError(400, "lora_path must be inside the export folder or --adapters-dir "
                                f"({', '.join(map(str, roots))})", "lora_path", "path_not_allowed")
        if path.is_dir() and (path / f"{path.name}{ADAPTER_SUFFIX}").is_file():  # a folder named like its file
            path = path / f"{path.name}{ADAPTER_SUFFIX}"
        if path.suffix != ADAPTER_SUFFIX or not path.is_file():
            raise APIError(400, f"lora_path: no {ADAPTER_SUFFIX} file at {body.lora_path} (make one with "
                                "`qlora-rt export-adapter`)", "lora_path")
        try:
            await run_in_threadpool(_load, state, body.lora_name, path)
        except QloraError as e:
            raise APIError(400, str(e), "lora_path") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter):
        if body.lora_name not in state["adapters"]:
            raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", "lora_name", "model_not_found",
                           "not_found_error")
        del state["adapters"][body.lora_name]
        if "engine" in state:
            state["engine"].remove_adapter(body.lora_name)  # requests using it finish with it
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if "classifier" not in state:
            raise APIError(400, f"{folder} is a decoder export; use /v1/chat/completions or /v1/completions",
                           None, "wrong_endpoint")
        adapter = resolve_model(body.model)
        if adapter is None and meta.mode == "adapter-aware":
            raise APIError(400, f"{base_name} has no classification head of its own; name one of its adapters "
                                f"({', '.join(sorted(state['adapters'])) or 'none loaded'})", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t.strip() for t in texts):
            raise APIError(400, "input: give one or more non-empty texts", "input")
        clf = state["classifier"]
        path = state["adapters"].get(adapter) if adapter else None
        try:
            preds = await run_in_threadpool(clf.classify, texts, adapter=path)
        except QloraError as e:
            raise APIError(400, str(e)) from None
        tokens = sum(len(clf.tokenizer.encode(t).ids) for t in texts)
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"index": i, "object": "classification", "label": p.label, "probs": p.probs}
                         for i, p in enumerate(preds)]}

    def engine_or_400():
        if "engine" not in state:
            raise APIError(400, f"{folder} is a classifier (encoder) export; use /v1/classify", None,
                           "wrong_endpoint")
        return state["engine"]

    async def constrain(reqs: list[EngineRequest], fmt: ResponseFormat | None) -> None:
        """response_format json_object / json_schema: each request's tokens kept to the JSON it allows."""
        if fmt is None or fmt.type == "text":
            return
        try:
            schema = schema_of(fmt.model_dump())
            for r in reqs:
                r.constraint = await run_in_threadpool(state["grammars"].json, schema)
        except QloraError as e:
            raise APIError(400, str(e), "response_format") from None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        engine = engine_or_400()
        adapter = resolve_model(body.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        model = state["model"]
        try:
            ids = await run_in_threadpool(model.encode, messages)
        except QloraError as e:
            raise APIError(400, str(e), "messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.tools and body.tool_choice != "none":  # answering in plain text would be silently wrong
            raise APIError(400, "tools: this server does not call tools (function calling); send no tools, or "
                                "tool_choice \"none\"", "tools")
        reqs = [_request(engine, ids, adapter, limit, body, top, i, "messages") for i in range(body.n)]
        await constrain(reqs, body.response_format)
        rid, kind = f"chatcmpl-{uuid.uuid4().hex[:24]}", "chat.completion"
        return await _respond(engine, model, reqs, body, request, rid, kind, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        engine = engine_or_400()
        adapter = resolve_model(body.model)
        model = state["model"]
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt: give a string, a list of strings, or token ids", "prompt")
        vocab = model.meta.vocab
        all_ids = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt: an empty string", "prompt")
                all_ids.append(await run_in_threadpool(lambda p=p: model.tokenizer.encode(p).ids))
            else:
                if not p or any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
                all_ids.append(list(p))
        reqs = [_request(engine, ids, adapter, body.max_tokens, body, body.logprobs, i, "prompt")
                for ids in all_ids for i in range(body.n)]
        await constrain(reqs, body.response_format)
        rid, kind = f"cmpl-{uuid.uuid4().hex[:24]}", "text_completion"
        return await _respond(engine, model, reqs, body, request, rid, kind, chat=False)

    return app


def _default_name(base_model: str) -> str:
    name = Path(str(base_model)).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name or "base"


def _load(state: dict, name: str, path: Path) -> None:
    if "engine" in state:
        state["engine"].add_adapter(name, path)
    else:
        state["classifier"].labels(path)  # reads and checks it
    state["adapters"][name] = path


def _request(engine: Engine, ids: list[int], adapter: str | None, limit: int | None, body: Sampled,
             logprobs: int | None, i: int, field: str) -> EngineRequest:
    room = engine.capacity - len(ids) - 1
    if room < 1:
        raise APIError(400, f"{field}: {len(ids)} tokens; this server's context is {engine.capacity} tokens "
                            "(--max-seq-len)", field, "context_length_exceeded")
    if limit is not None and limit > room:
        raise APIError(400, f"max_tokens: {limit} new tokens and {len(ids)} in the {field} pass this server's "
                            f"context of {engine.capacity} tokens (at most {room} here)", "max_tokens",
                       "context_length_exceeded")
    try:
        stop = _stops(body.stop)
    except QloraError as e:
        raise APIError(400, str(e), "stop") from None
    seed = body.seed + i if body.seed is not None else None
    top_k = body.top_k if body.top_k > 0 else 0
    bias = None
    if body.logit_bias:
        vocab = engine.m.meta.vocab
        try:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias: keys are token ids (integers, as strings)", "logit_bias") from None
        if any(not 0 <= t < vocab for t in bias) or any(not -100 <= b <= 100 for b in bias.values()):
            raise APIError(400, f"logit_bias: token ids must be in [0, {vocab}) and biases in [-100, 100]",
                           "logit_bias")
    sampling = Sampling(body.temperature, top_k, body.top_p, seed, body.presence_penalty, body.frequency_penalty, bias)
    return EngineRequest(ids, adapter, limit or room, sampling, stop, logprobs, body.ignore_eos)


async def _respond(engine: Engine, model, reqs: list[EngineRequest], body: Sampled, request: Request, rid: str,
                   kind: str, chat: bool):
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in reqs]
    lives = []
    try:
        for q, r in zip(queues, reqs):
            lives.append(engine.submit(r, lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev)))
    except QueueFull as e:
        for live in lives:
            engine.cancel(live)
        raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error", {"Retry-After": "1"}) from None
    except QloraError as e:
        for live in lives:
            engine.cancel(live)
        raise APIError(400, str(e)) from None
    created = int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, model, lives, queues, rid, kind, created, body.model, chat, usage,
                                         body.n),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = []
    try:
        for q in queues:
            results.append(await _collect(q, request))
    finally:
        for live in lives:
            engine.cancel(live)  # no-op for finished ones; frees the rest if the client went away
    if any(r is None for r in results):
        return JSONResponse({}, status_code=499)
    failed = next((r[0].error for r in results if r[0].finish == "error"), None)
    if failed:
        raise APIError(500, failed, None, "model_error", "server_error")
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (done, tokens, pieces, lps) in enumerate(results):
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": index, "finish_reason": done.finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = {"content": [_chat_logprob(model, lp) for lp in lps]} if lps else None
        else:
            choice["text"] = text
            choice["logprobs"] = _completion_logprobs(model, lps) if lps else None
        choices.append(choice)
        completion_tokens += done.completion_tokens
        if index % body.n == 0:
            prompt_tokens += done.prompt_tokens
    return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _collect(q: asyncio.Queue, request: Request):
    """A request's events until it finishes: (last event, tokens, text pieces, logprobs); None if the client
    went away first."""
    tokens, pieces, lps = [], [], []
    while True:
        try:
            ev: Event = await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if ev.finish:
            return ev, tokens, pieces, lps
        tokens += ev.tokens
        pieces.append(ev.text)
        lps += ev.logprobs


async def _stream(engine, model, lives, queues, rid, kind, created, name, chat, usage, n):
    """Server-sent events: one chunk per piece of text, a last chunk with finish_reason, then (with
    stream_options.include_usage) a chunk of usage, then `data: [DONE]`."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra):
        return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": name,
                                       "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            for i in range(len(queues)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
        prompt_tokens = completion_tokens = 0
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                ev: Event = fut.result()
                if ev.finish == "error":
                    yield "data: " + json.dumps({"error": {"message": ev.error, "type": "server_error",
                                                           "param": None, "code": "model_error"}}) + "\n\n"
                    continue
                if ev.finish:
                    prompt_tokens += ev.prompt_tokens if i % n == 0 else 0  # once a prompt, not once a choice
                    completion_tokens += ev.completion_tokens
                    c = {"index": i, "finish_reason": ev.finish, "logprobs": None}
                    c.update({"delta": {}} if chat else {"text": ""})
                    yield chunk([c])
                    continue
                if ev.text or ev.logprobs:
                    c = {"index": i, "finish_reason": None}
                    if chat:
                        c["delta"] = {"content": ev.text}
                        c["logprobs"] = {"content": [_chat_logprob(model, lp) for lp in ev.logprobs]} \
                            if ev.logprobs else None
                    else:
                        c["text"] = ev.text
                        c["logprobs"] = _completion_logprobs(model, ev.logprobs) if ev.logprobs else None
                    yield chunk([c])
                pending[asyncio.ensure_future(queues[i].get())] = i
        if usage:
            yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the response task is cancelled) or all finished: free the rows
        for live in lives:
            engine.cancel(live)
        for fut in list(locals().get("pending", {})):
            fut.cancel()


def _token_text(model, token: int) -> str:
    return model.tokenizer.decode([token])


def _chat_logprob(model, lp: dict) -> dict:
    def one(t, v):
        s = _token_text(model, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}
    return {**one(lp["token"], lp["logprob"]), "top_logprobs": [one(t, v) for t, v in lp["top"]]}


def _completion_logprobs(model, lps: list[dict]) -> dict:
    return {"tokens": [_token_text(model, lp["token"]) for lp in lps],
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{_token_text(model, t): v for t, v in lp["top"]} for lp in lps],
            "text_offset": []}
