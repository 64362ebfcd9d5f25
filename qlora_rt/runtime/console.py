"""`qlora-rt generate` and `qlora-rt chat`: the runtime at a terminal. torch-free, like the runtime."""

from __future__ import annotations

import sys
from collections.abc import Callable

from qlora_rt.config import ChatConfig, GenerateConfig
from qlora_rt.errors import QloraError
from qlora_rt.runtime.decoder import Completion, Model


def _stats(c: Completion) -> str:
    return (f"[{c.prompt_tokens} prompt tokens, {len(c.tokens)} new, finish: {c.finish_reason}; "
            f"time to first token {1000 * c.ttft_s:.0f} ms, decode {c.decode_tokens_per_s:.1f} tokens/s]")


def generate(cfg: GenerateConfig, out=None, err=None) -> list[Completion]:
    cfg.check()
    out, err = out or sys.stdout, err or sys.stderr
    model = Model(cfg.folder, threads=cfg.threads)
    if cfg.stream and len(cfg.prompt) == 1:
        stream = model.stream(cfg.prompt[0], chat=cfg.chat, system=cfg.system, **cfg.sampling())
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        results = [stream.result]
    else:
        results = model.generate(list(cfg.prompt), chat=cfg.chat, system=cfg.system, **cfg.sampling())
        for i, c in enumerate(results):
            out.write(c.text + "\n" if len(results) == 1 else f"[{i}] {c.text}\n")
    if cfg.verbose:
        for c in results:
            print(_stats(c), file=err)
    return results


HELP = "commands: /reset (forget the conversation), /adapter NAME|none, /exit"


def chat(cfg: ChatConfig, read: Callable[[str], str] = input, out=None, err=None) -> list[dict]:
    """An interactive conversation; the history is re-sent each turn, its oldest exchanges left out when the
    context cannot hold them. A message that cannot fit even alone is refused and the session goes on."""
    cfg.check()
    out, err = out or sys.stdout, err or sys.stderr  # looked up now: tests and callers may replace them
    model = Model(cfg.folder, threads=cfg.threads, verb="chat")
    adapter = cfg.adapter
    if adapter:
        model.load_adapter(adapter)
    messages: list[dict] = []
    print(f"qlora-rt chat: {cfg.folder} (adapter: {adapter or 'none'}). {HELP}", file=err)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return messages
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = []
            continue
        if line.startswith("/adapter"):
            name = line.split(maxsplit=1)[1] if " " in line else "none"
            try:
                adapter = None if name == "none" else (model.load_adapter(name) and name)
            except QloraError as e:
                print(f"error: {e}", file=err)
            continue
        if line.startswith("/"):
            print(HELP, file=err)
            continue
        turn = {"role": "user", "content": line}
        try:
            reply = _reply(model, cfg, messages, turn, adapter, out, err)
        except QloraError as e:  # the message is not added: the conversation stays as it was
            print(f"error: {e}", file=err)
            continue
        messages += [turn, {"role": "assistant", "content": reply.text}]
        if cfg.verbose:
            print(_stats(reply), file=err)


def fit_history(model: Model, system: str | None, history: list[dict], turn: dict, room: int) -> list[dict]:
    """The conversation to send: the system message, as many of the latest whole exchanges of `history`
    as leave `room` tokens for the reply, and the new user turn. The new turn is never cut, and the history
    never starts with an assistant turn. Raises when the new turn does not fit even alone."""
    head = [{"role": "system", "content": system}] if system else []
    ctx = model.meta.max_context
    starts = [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]
    for start in starts:  # oldest first: keep as much history as fits
        convo = head + history[start:] + [turn]
        n = len(model.encode(convo))
        if n + room <= ctx or (start == len(history) and n < ctx):
            return convo
    raise QloraError(f"this message is {n} tokens with the chat template{' and the system message' if system else ''}; "
                     f"this export's context is {ctx} tokens: shorten it (the conversation so far is kept)")


def _reply(model: Model, cfg: ChatConfig, history: list[dict], turn: dict, adapter: str | None, out,
           err) -> Completion:
    convo = fit_history(model, cfg.system, history, turn, cfg.max_new_tokens)
    left_out = len(history) - (len(convo) - 1 - bool(cfg.system))
    if left_out:
        print(f"[the {left_out} oldest messages no longer fit the context and were left out]", file=err)
    stream = model.stream(convo, **{**cfg.sampling(), "adapter": adapter})
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.result
