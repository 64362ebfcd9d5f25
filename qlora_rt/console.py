"""`qlora-rt generate` and `qlora-rt chat`: the runtime at a terminal. torch-free, like the runtime."""

from __future__ import annotations

import sys
from collections.abc import Callable

from qlora_rt.config import ChatConfig, GenerateConfig
from qlora_rt.errors import QloraError
from qlora_rt.runtime import Completion, Model


def _stats(c: Completion) -> str:
    return (f"[{c.prompt_tokens} prompt tokens, {len(c.tokens)} new, finish: {c.finish_reason}; "
            f"time to first token {1000 * c.ttft_s:.0f} ms, decode {c.decode_tokens_per_s:.1f} tokens/s]")


def generate(cfg: GenerateConfig, out=sys.stdout, err=sys.stderr) -> list[Completion]:
    cfg.check()
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


def chat(cfg: ChatConfig, read: Callable[[str], str] = input, out=sys.stdout, err=sys.stderr) -> list[dict]:
    """An interactive conversation; the whole history is re-sent each turn (oldest turns dropped if too long)."""
    cfg.check()
    model = Model(cfg.folder, threads=cfg.threads)
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
        messages.append({"role": "user", "content": line})
        reply = _reply(model, cfg, messages, adapter, out)
        messages.append({"role": "assistant", "content": reply.text})
        if cfg.verbose:
            print(_stats(reply), file=err)


def _reply(model: Model, cfg: ChatConfig, messages: list[dict], adapter: str | None, out) -> Completion:
    convo = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + messages
    # keep room for the reply: drop the oldest exchanges until the prompt fits
    while len(convo) > 1 and len(model.encode(convo)) + cfg.max_new_tokens > model.meta["max_context"]:
        convo.pop(1 if cfg.system else 0)
    stream = model.stream(convo, **{**cfg.sampling(), "adapter": adapter})
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.result
