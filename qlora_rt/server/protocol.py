"""The API's request bodies and its error shape (OpenAI's: {"error": {"message", "type", "param", "code"}}).

Unknown fields are accepted and ignored, as OpenAI's own server does. Ranges come from runtime/sampling.py,
the one place they are defined; `Sampled.sampling` turns a body into the runtime's Sampling.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qlora_rt.errors import QloraError
from qlora_rt.runtime.sampling import PENALTY, SEED_LIMIT, Sampling, stop_strings

MAX_BODY = 32 << 20  # bytes of a request body (by its Content-Length)
MAX_TEMPERATURE = 2.0  # OpenAI's bound (the runtime takes any temperature >= 0)
MAX_N = 16  # choices per prompt


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error(status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, v):
        """JSON may carry a lone surrogate (\\ud800), which no tokenizer can take: refused here, as a 400."""
        _check_unicode(v)
        return v


def _check_unicode(v) -> None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode text: a lone surrogate ({v[e.start]!r}) at character {e.start}") \
                from None
    elif isinstance(v, (list, tuple)):
        for x in v:
            _check_unicode(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_unicode(k)
            _check_unicode(x)


class StreamOptions(_Body):
    include_usage: bool = False


class Sampled(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)               # an extra field, as vLLM takes it (0 or -1: off)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = Field(None)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False                  # an extra field (vLLM's): decode max_tokens exactly (benchmarks)
    presence_penalty: float = Field(0.0, ge=PENALTY[0], le=PENALTY[1])
    frequency_penalty: float = Field(0.0, ge=PENALTY[0], le=PENALTY[1])
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) -> bias in LOGIT_BIAS

    def sampling(self, choice: int, vocab: int) -> Sampling:
        """The runtime's Sampling for choice `choice` of this request (seeded choices get seed + choice)."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias: keys are token ids (integers, as strings)", "logit_bias") from None
        s = Sampling(self.temperature, self.top_k if self.top_k > 0 else 0, self.top_p,
                     self.seed + choice if self.seed is not None else None, self.presence_penalty,
                     self.frequency_penalty, bias)
        try:
            s.check(vocab)
        except QloraError as e:
            raise APIError(400, str(e), "logit_bias" if "logit_bias" in str(e) else None) from None
        return s

    def stops(self) -> tuple[str, ...]:
        try:
            return stop_strings(self.stop)
        except QloraError as e:
            raise APIError(400, str(e), "stop") from None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None           # a tool's result answers this call

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


class Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (none: any object)


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatBody(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # accepted; a reply makes at most one call


class CompletionBody(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False                        # the prompt's text before each choice's
    best_of: int | None = Field(None, ge=1)  # only = n: ranking more candidates than are returned is not done
    suffix: str | None = None                 # refused: no fill-in-the-middle
    response_format: ResponseFormat | None = None  # an extra field here, as vLLM takes it

    def refuse_unsupported(self) -> None:
        """Fields OpenAI's completions take that this server does not honour: a 400 naming each, never ignored."""
        if self.suffix:
            raise APIError(400, "suffix: this server does not insert text between a prompt and a suffix "
                                "(fill-in-the-middle); send no suffix", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of: only best_of = n ({self.n}) is served (every candidate is returned); "
                                "use n", "best_of")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo: with logprobs the prompt's own log-probabilities would be returned, which "
                                "this server does not compute; send echo or logprobs", "echo")


class ClassifyBody(_Body):
    model: str
    input: str | list[str]


class LoadAdapter(_Body):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    lora_path: str = Field(min_length=1)


class UnloadAdapter(_Body):
    lora_name: str = Field(min_length=1)
