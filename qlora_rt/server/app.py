"""The server's app over one export folder: its state, error handlers and middlewares; the routes are in
routes.py. Every error has the OpenAI shape and a 4xx status; a request the model fails on gets a 500 in
the same shape."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_rt.runtime import manifest
from qlora_rt.server.adapters import Adapters
from qlora_rt.server.metrics import Metrics
from qlora_rt.server.middleware import Guard
from qlora_rt.server.protocol import MAX_BODY, APIError, error
from qlora_rt.server.routes import router
from qlora_rt.server.state import State


def create_app(folder: str | Path, *, api_key: str | None = None, max_batch: int = 8, threads: int = 0,
               adapters_dir: str | Path | None = None, served_model_name: str | None = None,
               max_seq_len: int = 2048, max_queue: int | None = None, max_body: int = MAX_BODY,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The server's app for one export folder (uvicorn runs it; tests call it in-process). allowed_hosts:
    the Host names it answers to (None: any; `serve` on this machine passes its loopback names)."""
    folder = Path(folder)
    meta = manifest.read(folder)
    state = State(folder, meta, served_model_name or _default_name(meta.base_model), Adapters(folder, adapters_dir))
    if meta.family == "decoder":
        from qlora_rt.runtime.batching import Engine
        from qlora_rt.runtime.constrained import Grammars
        from qlora_rt.runtime.decoder import Model

        state.model = Model(folder, threads, verb="serve")
        state.engine = Engine(state.model, max_batch=max_batch, max_seq_len=max_seq_len,
                              max_queue=max_queue if max_queue is not None else 4 * max_batch)
        state.grammars = Grammars(folder, state.model.meta.vocab, sorted(state.model.eos))
        # no token covers more characters than the vocabulary's longest; normalization may shrink text a
        # little (composed characters): 4x that is a bound no text that fits the context comes near
        longest = max(map(len, state.model.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        state.max_prompt_chars = 4 * longest * state.engine.capacity
    else:
        from qlora_rt.runtime.classifier import Classifier

        state.classifier = Classifier(folder, threads)
    state.adapters.engine, state.adapters.classifier = state.engine, state.classifier
    if meta.mode == "adapter-aware":
        state.adapters.load_own()

    @asynccontextmanager
    async def lifespan(app):
        yield
        if state.engine is not None:  # uvicorn has let the running responses finish (or given up on them)
            await run_in_threadpool(state.engine.close, 5.0)

    app = FastAPI(title="qlora-rt", lifespan=lifespan)
    app.state.qlora = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error(e.status, e.message, e.param, e.code, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({first.get('msg')})", None, "invalid_json")
        return error(400, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), None, None,
                     "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug of ours: still the API's shape, and one line
        return error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     None, None, "server_error")

    state.metrics = Metrics(state)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, allowed_hosts=allowed_hosts,
                       answered=state.metrics.answered)
    app.include_router(router)
    return app


def _default_name(base_model: str) -> str:
    name = Path(str(base_model)).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name or "base"
