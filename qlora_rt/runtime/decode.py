"""The decode core, one for every way a decoder export is run: `Model.generate`/`stream` (the CLI's generate and
chat, the Python API) in the calling thread, and the serving `Engine` (runtime/batching.py) in its own.
Torch-free. The browser runtime (qlora_rt/web/qlora-rt.mjs) follows the same feeds and the same step.

- `Rows`: a KV cache of n rows over a session and the runs over it. Every run feeds the same inputs
  (`FEEDS`, made by `feeds`): T new tokens at the end of each row's cache, each row holding its own number
  of positions from 0 (`row_lengths`: rows of any lengths share a step without padding), and the logits of
  the last position only (`logits_to_keep`). A prompt runs in chunks of `PREFILL_CHUNK` positions from
  position 0, so its products see the same rows however it arrives (alone, after a cached prefix, beside
  other streams) and a reply depends on its request alone.
- `Reply`: one reply as it is decoded. From its row's logits it picks the next token (logit bias and
  penalties, a constraint's mask, greedy or seeded sampling, logprobs), finishes on end of text, a stop
  string, a finished constraint or its length, and says what text the token adds (whole characters only,
  none that could begin a stop string, until it finishes).

What is scheduled when (whose prompt, which rows in a step, which adapters) is the caller's: the Engine's
slots and prefix cache, or `Model`'s rows in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.kv_cache import KVCache
from qlora_rt.runtime.sampling import Sampling
from qlora_rt.runtime.text import Text, held_back

PREFILL_CHUNK = 64  # prompt positions a run: a prompt's chunks start at multiples of it
# what every run feeds besides the cache and the LoRA inputs (an export from before row_lengths or
# logits_to_keep gets the others; without row_lengths a run holds one row)
FEEDS = (io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, io.ROW_LENGTHS, io.LOGITS_TO_KEEP)


@dataclass
class Request:
    """What a reply is asked to be."""
    ids: list[int]
    adapter: str | None = None           # the serving engine's name of a loaded adapter; None = the base
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None          # None: none; k >= 0: the chosen token's and the k most likely
    ignore_eos: bool = False
    constraint: object | None = None     # e.g. constrained.JsonConstraint: masks logits, follows the tokens


@dataclass
class Event:
    """What a reply gives, in order: pieces of text (`text`, `tokens`), then one with `finish` set
    ("stop" or "length", or "error" with `error` saying why)."""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)   # per token: {"token", "logprob", "top": [(id, lp)]}
    finish: str | None = None
    error: str | None = None
    code: str | None = None  # with an error: "shutting_down" (the server is stopping) or None (the model failed)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def feeds(ids: np.ndarray, lengths: np.ndarray, keep: int = 1) -> dict[str, np.ndarray]:
    """The inputs of one run: ids (B, T) go to the end of each row's cache, whose lengths (B,) count them in;
    keep: logits of the last `keep` positions (0: all)."""
    t, width = ids.shape[1], int(lengths.max())
    values = (ids, (np.arange(width)[None] < lengths[:, None]).astype(np.int64),
              lengths[:, None] - t + np.arange(t)[None], lengths, np.array(keep, np.int64))
    return {name: np.array(a, np.int64, order="C") for name, a in zip(FEEDS, values)}  # copies: ours to bind


def prompt_chunk(meta, n: int, chunk: int = PREFILL_CHUNK) -> int:
    """The positions a run of an n-token prompt takes: `chunk`, or the whole prompt where it passes a LongRoPE
    export's switch length (the graph picks the tables on a run's total length: the prompt's positions take
    the long ones, as transformers computes them, only when they run together)."""
    return n if meta.long_rope_from and n > meta.long_rope_from else chunk


def prompt_chunks(ids: list[int], start: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, list[int]]]:
    """The runs of a prompt from `start` (a multiple of `chunk`, where a cached prefix ends): (end, tokens)."""
    return [(min(k + chunk, len(ids)), ids[k:k + chunk]) for k in range(start, len(ids), chunk)]


class Rows:
    """A KV cache of `rows` rows over an export's session, and the runs over it: each over a window of rows
    first .. first+n-1 (a prompt's chunk: one row; a decode step: the rows decoding, and whatever lies between
    them writing one throwaway position where nothing is kept).

    Each window keeps its I/O binding from run to run (the cache bound once, its last position's logits
    written into a buffer of the cache's own); a run rebinds only its token inputs, and the LoRA inputs
    when they change. The logits a run returns are that buffer: read them before the next run."""

    def __init__(self, session: ort.InferenceSession, input_names: set[str], meta, rows: int, capacity: int) -> None:
        self.session, self.rows, self.capacity = session, rows, capacity
        self.kv = KVCache(meta, rows, capacity)
        self.feeds = [n for n in FEEDS if n in input_names]
        self.per_row = io.ROW_LENGTHS in input_names  # without it, one row a run
        self.keeps_last = io.LOGITS_TO_KEEP in input_names
        self.logits = np.empty((rows, 1, meta.vocab), np.float32)
        # (first, n) -> [binding, the LoRA inputs bound (held: the binding does not), the feeds bound, logits]
        self._windows: dict[tuple[int, int], list] = {}

    def run(self, first: int, ids: np.ndarray, lengths: np.ndarray, lora: dict[str, ort.OrtValue],
            keep: int = 1) -> np.ndarray:
        """One run over rows first .. first+B-1: ids (B, T) at the end of each row's cache (lengths (B,) count
        them in). Logits (B, V) of the last position, or (B, T, V) of every position with keep=0."""
        n = len(ids)
        if n > 1 and not self.per_row:
            raise ValueError("this export takes one row a run (it has no row_lengths input)")
        window = self._window(first, n, lora)
        binding = window[0]
        values = feeds(ids, lengths, keep)
        held = [ort.OrtValue.ortvalue_from_numpy(values[name]) for name in self.feeds]
        for name, value in zip(self.feeds, held):
            binding.bind_ortvalue_input(name, value)
        window[2] = held  # alive while the binding holds them
        buffered = keep == 1 and (self.keeps_last or ids.shape[1] == 1)
        if not buffered:
            binding.bind_output(io.LOGITS)
        self.session.run_with_iobinding(binding)
        if buffered:
            return self.logits[first:first + n, -1]
        out = binding.get_outputs()[0].numpy()
        binding.bind_ortvalue_output(io.LOGITS, window[3])  # back to the buffer for the next run
        return out if keep == 0 else out[:, -1]

    def forget(self, values) -> None:
        """Drop the windows whose binding holds any of these LoRA inputs (an adapter unloaded, a stack of
        adapters no longer kept): a window holds the last inputs it ran with, so a window not run since would
        keep them, and their memory, alive. A dropped window is bound afresh when next run."""
        gone = {id(v) for v in values}
        for key in [k for k, w in self._windows.items() if any(id(v) in gone for v in w[1].values())]:
            del self._windows[key]

    def _window(self, first: int, n: int, lora: dict[str, ort.OrtValue]) -> list:
        window = self._windows.get((first, n))
        if window is not None and window[1] is lora:  # the same inputs as the last run (one adapter's, or none)
            return window
        if window is not None and window[1].keys() == lora.keys():
            for name, value in lora.items():
                window[0].bind_ortvalue_input(name, value)
            window[1] = lora
            return window
        binding = self.session.io_binding()  # new, or the LoRA inputs named differ: none left over
        out = ort.OrtValue.ortvalue_from_numpy(self.logits[first:first + n])
        binding.bind_ortvalue_output(io.LOGITS, out)
        self.kv.bind(binding, first, n)
        for name, value in lora.items():
            binding.bind_ortvalue_input(name, value)
        self._windows[(first, n)] = window = [binding, lora, [], out]
        return window


class Reply:
    """One reply as it is decoded: `take` its row's logits after each run that ends at its last position."""

    def __init__(self, req: Request, tokenizer, eos: set[int], capacity: int) -> None:
        """capacity: the positions its cache row holds (the prompt's and the reply's): it ends there."""
        self.req, self.eos, self.capacity = req, eos, capacity
        self.text = Text(tokenizer, req.stop)  # the tokens produced and their text
        self.sent = 0                          # characters of text already given
        self.rng = np.random.default_rng(req.sampling.seed)
        self.finish: str | None = None
        self.error: str | None = None
        self.t_start = time.perf_counter()
        self.t_first: float | None = None      # when its first token was picked

    @property
    def tokens(self) -> list[int]:
        return self.text.tokens

    def take(self, logits: np.ndarray, what: str = "") -> Event | None:
        """The next token from its row's logits (V,): the piece of text it adds, or None. At the end of text
        the piece is what was held back (no token), None where nothing was; logits that are not finite
        numbers end the reply with `error`. `finish` is set once the reply is done. what: whose the logits
        are, for the error (e.g. " (adapter 'a')")."""
        req = self.req
        self.t_first = self.t_first or time.perf_counter()
        if not np.isfinite(logits).all():  # e.g. this row's own adapter overflowed: its reply alone says so
            self.finish = "error"
            self.error = f"the model's next-token scores for this request are not finite numbers{what}"
            return None
        raw = logits  # logprobs are the model's own
        logits = req.sampling.adjust(logits, self.tokens)
        if req.constraint is not None:
            logits = logits.astype(np.float32, copy=logits is raw)
            req.constraint.mask(logits)
        token = int(req.sampling.pick(logits[None], self.rng)[0])
        if req.constraint is not None and token not in self.eos:
            req.constraint.accept(token)
        info = [_logprobs(raw, token, req.logprobs)] if req.logprobs is not None else []
        if token in self.eos and not req.ignore_eos:
            self.finish = "stop"  # as OpenAI's API says it: the model ended its text (or a stop string did)
            rest = self.text.text[self.sent:]  # what was held back (a stop string's start that none finished)
            self.sent += len(rest)
            return Event(text=rest, prompt_tokens=len(req.ids),
                         completion_tokens=len(self.tokens)) if rest else None
        if self.text.add(token) or (req.constraint is not None and req.constraint.done):
            self.finish = "stop"
        elif len(self.tokens) >= req.max_new_tokens or len(req.ids) + len(self.tokens) >= self.capacity:
            self.finish = "length"
        if self.finish:
            text = self.text.text  # the whole text, an incomplete last character included
            end = len(text)
        else:  # whole characters only, and none that could begin a stop string
            text = self.text.done  # not done + pending: no copy of the whole text a token
            end = len(text) - held_back(text, req.stop)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return Event(text=piece, tokens=[token], logprobs=info, prompt_tokens=len(req.ids),
                     completion_tokens=len(self.tokens))


def _logprobs(logits: np.ndarray, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely tokens' (the model's own distribution)."""
    z = logits.astype(np.float64)
    lse = z.max() + np.log(np.exp(z - z.max()).sum())
    top = np.argpartition(-z, k)[:k] if k else np.array([], int)
    top = top[np.argsort(-z[top])]
    return {"token": token, "logprob": float(z[token] - lse), "top": [(int(t), float(z[t] - lse)) for t in top]}


__all__ = ["FEEDS", "PREFILL_CHUNK", "Event", "Reply", "Request", "Rows", "feeds", "prompt_chunk", "prompt_chunks"]
