"""A request's reply in OpenAI's shape, whole or streamed as server-sent events, from the engine's events.

One `Reply` builds every piece of it (choices, logprobs, usage, chunks) for both ways, so the two stay
the same shape; `respond` submits the request's rows to the engine and returns either.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from qlora_rt.errors import QloraError
from qlora_rt.runtime.batching import Engine, Event, QueueFull, ShuttingDown
from qlora_rt.runtime.batching import Request as EngineRequest
from qlora_rt.server.protocol import APIError


class Reply:
    def __init__(self, model, chat: bool, name: str, n: int, metrics=None) -> None:
        """model: the runtime Model (its tokenizer spells logprobs); name: the model name the client sent;
        n: choices per prompt (usage counts a prompt once); metrics: told the tokens of each finished reply."""
        self.m, self.chat, self.name, self.n, self.metrics = model, chat, name, n, metrics
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.echo: list[str] | None = None  # completions with echo: each row's prompt text, sent first
        self.tools = None  # server.tools.Tools of a chat request that may call them: a call becomes tool_calls

    # ---- pieces ------------------------------------------------------------------------------------
    def _token(self, token: int) -> str:
        return self.m.tokenizer.decode([token])

    def logprobs(self, lps: list[dict]) -> dict | None:
        if not lps:
            return None
        if self.chat:
            def one(t, v):
                s = self._token(t)
                return {"token": s, "logprob": v, "bytes": list(s.encode())}
            return {"content": [{**one(lp["token"], lp["logprob"]), "top_logprobs": [one(t, v) for t, v in lp["top"]]}
                                for lp in lps]}
        return {"tokens": [self._token(lp["token"]) for lp in lps],
                "token_logprobs": [lp["logprob"] for lp in lps],
                "top_logprobs": [{self._token(t): v for t, v in lp["top"]} for lp in lps],
                "text_offset": []}

    def choice(self, index: int, text: str, finish: str, lps: list[dict]) -> dict:
        calls = self.tools.read(text) if self.tools is not None else None
        c: dict[str, Any] = {"index": index, "finish_reason": "tool_calls" if calls else finish}
        if calls:
            c["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        elif self.chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        c["logprobs"] = self.logprobs(lps)
        return c

    def piece(self, index: int, text: str, lps: list[dict]) -> dict:
        c: dict[str, Any] = {"index": index, "finish_reason": None}
        if self.chat:
            c["delta"] = {"content": text}
        else:
            c["text"] = text
        c["logprobs"] = self.logprobs(lps)
        return c

    def last_piece(self, index: int, finish: str) -> dict:
        c: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        c.update({"delta": {}} if self.chat else {"text": ""})
        return c

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The reply's usage, once it is complete (the metrics count it here, streamed or not)."""
        if self.metrics is not None:
            self.metrics.finished(self.name, prompt_tokens, completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def body(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.name,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({"id": self.id, "object": self.chunk_object, "created": self.created,
                                       "model": self.name, "choices": choices, **extra}) + "\n\n"

    @staticmethod
    def error_event(message: str, code: str) -> str:
        return "data: " + json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                                "code": code}}) + "\n\n"


async def respond(engine: Engine, reqs: list[EngineRequest], reply: Reply, request: Request, stream: bool,
                  include_usage: bool):
    """Submit the rows (all or none: a full queue is a 429), then the reply, whole or streamed."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in reqs]
    emits = [lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev) for q in queues]
    try:
        lives = engine.submit_many(reqs, emits)
    except QueueFull as e:
        raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error", {"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), None, "shutting_down", "server_error", {"Retry-After": "5"}) from None
    except QloraError as e:
        raise APIError(400, str(e)) from None
    if stream:
        return StreamingResponse(_stream(engine, lives, queues, reply, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    gone = asyncio.ensure_future(_disconnected(request))
    results = []
    try:
        for q in queues:
            results.append(await _collect(q, gone))
            if results[-1] is None:
                break
    finally:
        gone.cancel()
        for live in lives:
            engine.cancel(live)  # no-op for finished ones; frees the rest if the client went away
    if any(r is None for r in results):
        return JSONResponse({}, status_code=499)
    failed = next((r[0] for r in results if r[0].finish == "error"), None)
    if failed is not None:
        if failed.code == "shutting_down":
            raise APIError(503, failed.error, None, "shutting_down", "server_error", {"Retry-After": "5"})
        raise APIError(500, failed.error, None, "model_error", "server_error")
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (done, pieces, lps) in enumerate(results):
        choices.append(reply.choice(index, (reply.echo[index] if reply.echo else "") + "".join(pieces), done.finish,
                                    lps))
        completion_tokens += done.completion_tokens
        if index % reply.n == 0:
            prompt_tokens += done.prompt_tokens
    return reply.body(choices, reply.usage(prompt_tokens, completion_tokens))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(q: asyncio.Queue, gone: asyncio.Future):
    """A row's events until it finishes: (last event, text pieces, logprobs); None as soon as the client
    goes away (`gone` done), so its rows are freed at the engine's next step."""
    pieces, lps = [], []
    while True:
        get = asyncio.ensure_future(q.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            return None
        ev: Event = get.result()
        if ev.finish:
            return ev, pieces, lps
        pieces.append(ev.text)
        lps += ev.logprobs


async def _stream(engine: Engine, lives: list, queues: list[asyncio.Queue], reply: Reply, include_usage: bool):
    """Server-sent events: one chunk per piece of text, a last chunk with finish_reason, then (with
    stream_options.include_usage) a chunk of usage, then `data: [DONE]`."""
    pending: dict[asyncio.Future, int] = {}
    held = [["", [], reply.tools is not None] for _ in queues]  # text and logprobs held back, still maybe a call
    try:
        if reply.chat:
            for i in range(len(queues)):
                yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}])
        for i, text in enumerate(reply.echo or []):
            yield reply.chunk([reply.piece(i, text, [])])
        pending.update({asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)})
        prompt_tokens = completion_tokens = 0
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                ev: Event = fut.result()
                if ev.finish == "error":
                    yield reply.error_event(ev.error, ev.code or "model_error")
                    continue
                if ev.finish:
                    prompt_tokens += ev.prompt_tokens if i % reply.n == 0 else 0  # once a prompt, not a choice
                    completion_tokens += ev.completion_tokens
                    text, lps, _ = held[i]
                    calls = reply.tools.read(text) if text and reply.tools is not None else None
                    if calls:
                        yield reply.chunk([{"index": i, "delta": {"tool_calls": [{**c, "index": k} for k, c in
                                                                                 enumerate(calls)]},
                                            "finish_reason": None, "logprobs": None}])
                    elif text or lps:
                        yield reply.chunk([reply.piece(i, text, lps)])
                    yield reply.chunk([reply.last_piece(i, "tool_calls" if calls else ev.finish)])
                    continue
                if held[i][2]:  # a reply that may still be a tool call is held until it is known
                    held[i][0] += ev.text
                    held[i][1] += ev.logprobs
                    if reply.tools.may_become_call(held[i][0]):
                        pending[asyncio.ensure_future(queues[i].get())] = i
                        continue
                    ev = Event(text=held[i][0], logprobs=held[i][1])
                    held[i] = ["", [], False]
                if ev.text or ev.logprobs:
                    yield reply.chunk([reply.piece(i, ev.text, ev.logprobs)])
                pending[asyncio.ensure_future(queues[i].get())] = i
        usage = reply.usage(prompt_tokens, completion_tokens)
        if include_usage:
            yield reply.chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the response task is cancelled) or all finished: free the rows
        for live in lives:
            engine.cancel(live)
        for fut in pending:
            fut.cancel()
