"""Tool calls on /v1/chat/completions (OpenAI's `tools`, `tool_choice`, `tool_calls`, `role: "tool"`).

The prompt: a chat template that takes `tools` (it names the variable) gets them as Hugging Face templates
expect (the OpenAI tool objects; earlier calls' arguments as objects). A template without them gets the
default: a system message listing the functions' JSON schemas and the one way to call one,

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

(the Hermes / Qwen form, which many small instruct models know), earlier calls written that way in the
assistant's turns, and each tool result as the tool's turn in `<tool_response>` tags.

The reply is decoded under a grammar (llguidance, runtime/constrained.py): `auto` lets the model answer in
text or call; once its reply begins with `<tool_call>`, the call's JSON must name a given function and fit
that function's `parameters` schema (placed under the call's schema, its local `$ref`s, "#" included,
rewritten to point inside it). `required` and a named function allow only a call. A reply that is
a call becomes `tool_calls` with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import re
import uuid

from qlora_rt.runtime.constrained import LAYOUT
from qlora_rt.server.protocol import APIError, ChatBody, Message, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"^\s*<tool_call>(?P<json>.*)</tool_call>\s*$", re.S)
SYSTEM = ("You can call these functions:\n{functions}\nTo call one, reply with only "
          "<tool_call>{{\"name\": ..., \"arguments\": {{...}}}}</tool_call>")


class Tools:
    """One request's tools and choice: what the prompt gets, what the reply may be, how to read it."""

    def __init__(self, body: ChatBody) -> None:
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        self.tools = [t.function for t in body.tools or []]
        if choice != "none" and not self.tools:
            raise APIError(400, "tool_choice: no tools were given", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            named = [f for f in self.tools if f.name == choice.function.name]
            if not named:
                raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} was given", "tool_choice")
            self.callable, self.must_call = named, True
        else:
            self.callable, self.must_call = (self.tools if choice != "none" else []), choice == "required"
        self.active = bool(self.callable)
        # each function's parameters under the call's wrapper schema, its local $refs pointing there
        self.defs = {f"fn{i}": _rooted(f.parameters or {"type": "object"}, f"#/$defs/fn{i}")
                     for i, f in enumerate(self.callable)}
        for i, f in enumerate(self.callable):
            if self.defs[f"fn{i}"] == {"$ref": f"#/$defs/fn{i}"}:
                raise APIError(400, f"tools: the parameters of {f.name!r} refer only to themselves ($ref '#'), so "
                               "no arguments fit them", "tools")

    # ---- the prompt --------------------------------------------------------------------------------
    def messages(self, messages: list[Message], template_takes_tools: bool) -> tuple[list[dict], dict]:
        """The messages for the chat template, and the extra template variables (`tools`)."""
        if template_takes_tools:
            out = [_openai_message(m) for m in messages]
            return out, ({"tools": [{"type": "function", "function": f.model_dump(exclude_none=True)}
                                    for f in self.callable]} if self.active else {})
        out = [_plain_message(m) for m in messages]
        if self.active:
            listing = "\n".join(json.dumps(f.model_dump(exclude_none=True), separators=(",", ":"))
                                for f in self.callable)
            text = SYSTEM.format(functions=listing)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
            else:
                out.insert(0, {"role": "system", "content": text})
        return out, {}

    # ---- the reply ---------------------------------------------------------------------------------
    def grammar(self) -> str:
        """The Lark grammar of the reply (llguidance's dialect)."""
        call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                           "properties": {"name": {"const": f.name}, "arguments": {"$ref": f"#/$defs/fn{i}"}}}
                          for i, f in enumerate(self.callable)], "$defs": self.defs, "x-guidance": LAYOUT}
        rules = [f"call: {json.dumps(OPEN)} body {json.dumps(CLOSE)}", f"body: %json {json.dumps(call)}"]
        if self.must_call:
            return "\n".join(["start: call", *rules])
        # text that does not begin with the call's tag: once it does, the call's JSON is enforced
        return "\n".join(["start: call | text", *rules, "text: TEXT",
                          "TEXT: /(?s:.*)/ & ~/(?s:" + re.escape(OPEN) + ".*)/"])

    def read(self, text: str) -> list[dict] | None:
        """The reply's tool_calls (OpenAI's shape), or None if it is text."""
        m = CALL.match(text) if self.active else None
        if m is None:
            return None
        try:
            call = json.loads(m["json"])
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in {f.name for f in self.callable}:
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]

    @staticmethod
    def may_become_call(text: str) -> bool:
        """Whether a reply so far could still be (or is) a call: held back from a stream until it is known."""
        t = text.lstrip()
        return t.startswith(OPEN) or OPEN.startswith(t)


def _rooted(schema, where: str):
    """A function's parameters schema moved under the call's wrapper at JSON pointer `where`: each local $ref
    ("#", "#/$defs/City", what Pydantic writes) is rewritten to point inside it, since "#" now names the wrapper."""
    if isinstance(schema, dict):
        return {k: (where + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rooted(v, where))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rooted(v, where) for v in schema]
    return schema


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _openai_message(m: Message) -> dict:
    out: dict = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _plain_message(m: Message) -> dict:
    """A message for a template that knows nothing of tools: calls and results written as text."""
    text = m.text()
    if m.tool_calls:
        text += "".join(OPEN + json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)})
                        + CLOSE for c in m.tool_calls)
    if m.role == "tool":
        text = f"<tool_response>{text}</tool_response>"
    return {"role": m.role if m.role != "developer" else "system", "content": text}
