"""The endpoints (docs/serving.md): GET /health, GET /v1/models, POST /v1/chat/completions, POST
/v1/completions (decoder exports), POST /v1/classify (encoder exports), POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's names). The model name of a request is the base's served name or an
adapter's name. Each route parses, hands the work to the engine (or classifier) and replies."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from qlora_rt.errors import QloraError
from qlora_rt.runtime.batching import Engine
from qlora_rt.runtime.batching import Request as EngineRequest
from qlora_rt.runtime.constrained import schema_of
from qlora_rt.server.metrics import CONTENT_TYPE
from qlora_rt.server.protocol import (
    APIError,
    ChatBody,
    ClassifyBody,
    CompletionBody,
    LoadAdapter,
    ResponseFormat,
    Sampled,
    UnloadAdapter,
)
from qlora_rt.server.replies import Reply, respond
from qlora_rt.server.state import State
from qlora_rt.server.tools import Tools

router = APIRouter()


def _state(request: Request) -> State:
    return request.app.state.qlora


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    out = {"status": "ok"}
    if state.engine is not None:
        out["running"], out["waiting"] = state.engine.load
    return out


@router.get("/metrics")
async def metrics(request: Request):
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "qlora-rt",
             "root": str(state.meta.base_model), "parent": None}]
    data += [{"id": n, "object": "model", "created": state.created, "owned_by": "qlora-rt", "root": state.base_name,
              "parent": state.base_name} for n in state.adapters.names()]
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapter, request: Request):
    state = _state(request)
    if state.meta.mode != "adapter-aware":
        raise APIError(400, f"{state.folder} is a merged export; it takes no adapters", "lora_path")
    if body.lora_name in state.adapters or body.lora_name == state.base_name:
        raise APIError(400, f"a model named {body.lora_name!r} is already served; unload it first", "lora_name")
    path = state.adapters.resolve(body.lora_path)
    try:
        await run_in_threadpool(state.adapters.load, body.lora_name, path)
    except QloraError as e:
        raise APIError(400, str(e), "lora_path") from None
    return {"status": "ok", "lora_name": body.lora_name}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapter, request: Request):
    _state(request).adapters.unload(body.lora_name)
    return {"status": "ok", "lora_name": body.lora_name}


@router.post("/v1/classify")
async def classify(body: ClassifyBody, request: Request):
    state = _state(request)
    request.state.model = body.model
    if state.classifier is None:
        raise APIError(400, f"{state.folder} is a decoder export; use /v1/chat/completions or /v1/completions",
                       None, "wrong_endpoint")
    adapter = state.resolve_model(body.model)
    if adapter is None and state.meta.mode == "adapter-aware":
        raise APIError(400, f"{state.base_name} has no classification head of its own; name one of its adapters "
                            f"({', '.join(state.adapters.names()) or 'none loaded'})", "model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not t.strip() for t in texts):
        raise APIError(400, "input: give one or more non-empty texts", "input")
    clf = state.classifier
    path = state.adapters.path(adapter) if adapter else None
    try:
        preds = await run_in_threadpool(clf.classify, texts, adapter=path)
    except QloraError as e:
        raise APIError(400, str(e)) from None
    tokens = sum(len(clf.tokenizer.encode(t).ids) for t in texts)
    return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"index": i, "object": "classification", "label": p.label, "probs": p.probs}
                     for i, p in enumerate(preds)]}


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request):
    state = _state(request)
    request.state.model = body.model
    engine = state.decoder()
    adapter = state.resolve_model(body.model)
    tools = Tools(body)
    if tools.active and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format: not with tools (a reply is either a call or that format)",
                       "response_format")
    messages, extra = tools.messages(body.messages, state.model.template_takes_tools)
    state.check_length(sum(len(m["content"] or "") for m in messages), "messages")
    try:
        ids = await run_in_threadpool(lambda: state.model.encode(messages, tools=extra.get("tools")))
    except QloraError as e:
        raise APIError(400, str(e), "messages") from None
    limit = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = [_request(engine, ids, adapter, limit, body, top, i, "messages") for i in range(body.n)]
    if tools.active:
        try:
            for r in reqs:
                r.constraint = await run_in_threadpool(state.grammars.lark, tools.grammar())
        except QloraError as e:
            raise APIError(400, str(e), "tools") from None
    else:
        await _constrain(state, reqs, body.response_format)
    reply = Reply(state.model, True, body.model, body.n, state.metrics)
    reply.tools = tools if tools.active else None
    return await respond(engine, reqs, reply, request, body.stream, _include_usage(body))


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    state = _state(request)
    request.state.model = body.model
    engine = state.decoder()
    body.refuse_unsupported()
    adapter = state.resolve_model(body.model)
    model = state.model
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
            state.check_length(len(p), "prompt")  # before tokenizing: a 30 MB prompt is refused at once
            all_ids.append(await run_in_threadpool(lambda p=p: model.tokenizer.encode(p).ids))
        else:
            if not p or any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            all_ids.append(list(p))
    reqs = [_request(engine, ids, adapter, body.max_tokens, body, body.logprobs, i, "prompt")
            for ids in all_ids for i in range(body.n)]
    await _constrain(state, reqs, body.response_format)
    reply = Reply(model, False, body.model, body.n, state.metrics)
    if body.echo:  # each choice's text starts with its prompt's
        texts = [p if isinstance(p, str) else model.tokenizer.decode(list(p)) for p in prompts]
        reply.echo = [t for t in texts for _ in range(body.n)]
    return await respond(engine, reqs, reply, request, body.stream, _include_usage(body))


def _include_usage(body: Sampled) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _constrain(state: State, reqs: list[EngineRequest], fmt: ResponseFormat | None) -> None:
    """response_format json_object / json_schema: each request's tokens kept to the JSON it allows."""
    if fmt is None or fmt.type == "text":
        return
    try:
        schema = schema_of(fmt.model_dump())
        for r in reqs:
            r.constraint = await run_in_threadpool(state.grammars.json, schema)
    except QloraError as e:
        raise APIError(400, str(e), "response_format") from None


def _request(engine: Engine, ids: list[int], adapter: str | None, limit: int | None, body: Sampled,
             logprobs: int | None, choice: int, field: str) -> EngineRequest:
    """One row for the engine: the prompt's ids within the context, its sampling and stop strings."""
    room = engine.capacity - len(ids) - 1
    if room < 1:
        raise APIError(400, f"{field}: {len(ids)} tokens; this server's context is {engine.capacity} tokens "
                            "(--max-seq-len)", field, "context_length_exceeded")
    if limit is not None and limit > room:
        raise APIError(400, f"max_tokens: {limit} new tokens and {len(ids)} in the {field} pass this server's "
                            f"context of {engine.capacity} tokens (at most {room} here)", "max_tokens",
                       "context_length_exceeded")
    stop = body.stops()
    sampling = body.sampling(choice, engine.m.meta.vocab)
    return EngineRequest(ids, adapter, limit or room, sampling, stop, logprobs, body.ignore_eos)
