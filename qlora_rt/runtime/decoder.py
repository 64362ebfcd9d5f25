"""Offline inference on an exported folder with onnxruntime, numpy and tokenizers only (no torch).

    model = Model("runs/onnx")                       # model.onnx, tokenizer.json, qlora_rt_export.json
    model.generate("Rewrite 5 March 2021 as ISO 8601", chat=True, adapter="default")
    for piece in model.stream("Tell me a story", chat=True, temperature=0.7, seed=0): print(piece, end="")

Prompts and steps run through the decode core (decode.py), as the serving engine runs them, so a request
gives the same tokens here as from `serve`. The KV cache lives in one buffer per layer, appended in place
(kv_cache.py). Adapters are
`.onnx_adapter` files read with onnxruntime's adapter API (once, and again when the file changes), and
their tensors are bound per call as the graph's LoRA inputs; switching adapters never reloads the model.
No adapter = the base. (`RunOptions.add_active_adapter` would do the same binding, but onnxruntime ignores
it under I/O binding, and I/O binding is what keeps the cache in place.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qlora_rt.errors import QloraError
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime import manifest
from qlora_rt.runtime.chat_template import ChatTemplate
from qlora_rt.runtime.decode import Event, Reply, Request, Rows, prompt_chunk, prompt_chunks
from qlora_rt.runtime.sampling import Sampling, stop_strings
from qlora_rt.runtime.session import adapter_names, file_signature, find_adapter, open_session, read_adapter_file


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of text or a stop string) | "length"
    prompt_tokens: int
    ttft_s: float = 0.0  # prompt in -> first token out
    decode_tokens_per_s: float = 0.0  # the tokens after the first, per second
    logprobs: list[dict] = field(default_factory=list)  # with logprobs=k: per token {"token", "logprob", "top"}


class Model:
    """An exported qlora-rt folder, ready to generate; adapters by name (adapters/NAME.onnx_adapter) or path."""

    def __init__(self, folder: str | Path, threads: int = 0, verb: str = "generate") -> None:
        """verb: the command it serves, named in the error for an export of another family."""
        self.folder = Path(folder)
        self.meta = manifest.read(self.folder)
        manifest.expect(self.meta, "decoder", self.folder, verb)
        self.session = open_session(self.folder, threads)
        # with the overridable ones (LoRA inputs, logits_to_keep, row_lengths), which get_inputs() leaves out
        self.input_names = {i.name for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}
        self._check_session()
        self.tokenizer = _tokenizer(self.folder)
        self.template = _chat_template(self.folder)
        self._template_vars = _special_tokens(self.folder)  # bos_token etc., as chat templates expect
        self.eos = set(self.meta.eos_token_ids)
        pad = self.meta.pad_token_id
        self.pad = pad if pad is not None else self.meta.eos_token_ids[0]
        self._adapters: dict[Path, tuple] = {}  # each file's (signature, tensors): read again when it changes

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return adapter_names(self.folder)

    def load_adapter(self, name_or_path: str | Path, keep: bool = True) -> dict[str, ort.OrtValue]:
        """Load and check an adapter: a name under adapters/, or a path to an .onnx_adapter file. keep: hold
        its tensors for the next call (read again if the file changed since); False: the caller holds them
        (the server, which frees them on unload)."""
        if self.meta.mode != "adapter-aware":
            raise QloraError(f"--adapter: {self.folder} is a merged export; its adapter is already in the weights")
        path = find_adapter(self.folder, name_or_path)
        signature = file_signature(path)
        held = self._adapters.get(path)
        if held is not None and held[0] == signature:
            return held[1]
        params = read_adapter_file(path, self.meta)
        if keep:
            self._adapters[path] = signature, params
        return params

    # ---- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool = False, system: str | None = None,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt; chat=True (or a list of messages) goes through the folder's chat template
        (with `tools` for a template that takes them: see template_takes_tools)."""
        if isinstance(prompt, str) and not prompt.strip():
            raise QloraError("--prompt is empty")
        if chat or not isinstance(prompt, str):
            if self.template is None:
                raise QloraError(f"--chat: {self.folder} has no chat template (chat_template.jinja or "
                                 "tokenizer_config.json)")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if system:
                messages.insert(0, {"role": "system", "content": system})
            extra = {"tools": tools} if tools else {}
            text = self.template.render(messages=messages, add_generation_prompt=True, **self._template_vars, **extra)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` variable (Hugging Face's convention for tool calls)."""
        return self.template is not None and re.search(r"\btools\b", self.template.source) is not None

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, prompts: str | list, *, chat: bool = False, system: str | None = None,
                 **kw) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list of them, decoded side by side (-> list).

        kw: adapter (name or path; None = the base), max_new_tokens=128, stop=(), temperature=0 (greedy),
        top_k=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0, logit_bias=None ({token: bias}),
        logprobs=None (k: each token's log-probability and the k most likely, in Completion.logprobs).
        """
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise QloraError("no prompts given")
        out = self.generate_ids([self.encode(p, chat, system) for p in batch], **kw)
        return out[0] if single else out

    def generate_ids(self, ids: list[list[int]], *, adapter: str | Path | None = None, **kw) -> list[Completion]:
        """Completions of token-id prompts; ignore_eos=True decodes exactly max_new_tokens (benchmarks)."""
        run = self._run(ids, adapter, **kw)
        for _ in run:
            pass
        return run.result

    def logits(self, ids: list[int], adapter: str | Path | None = None) -> np.ndarray:
        """(T, vocab) logits of one token sequence: the export self-check compares them with PyTorch's."""
        return self.logits_batch([ids], adapter)[0]

    def logits_batch(self, seqs: list[list[int]], adapter: str | Path | None = None) -> list[np.ndarray]:
        """(T_i, vocab) logits of each sequence, its prompt's chunks run as `generate` runs them."""
        params = self.load_adapter(adapter) if adapter is not None else {}
        out = []
        for ids in seqs:
            self._check_prompt(ids)
            rows = Rows(self.session, self.input_names, self.meta, 1, len(ids))
            out.append(np.concatenate([rows.run(0, np.array([chunk], np.int64), np.array([end], np.int64), params, 0)[0]
                                       for end, chunk in prompt_chunks(ids, 0, prompt_chunk(self.meta, len(ids)))]))
        return out

    def stream(self, prompt: str | list[dict], **kw) -> Stream:
        """Like generate() for one prompt, but iterate to get the text as it is produced; .result at the end."""
        return Stream(self, prompt, **kw)

    def _run(self, ids: list[list[int]], adapter, *, max_new_tokens: int = 128, stop: list[str] | tuple = (),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             ignore_eos: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             logit_bias: dict[int, float] | None = None, logprobs: int | None = None) -> _Run:
        sampling = Sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias)
        sampling.check(self.meta.vocab)
        if max_new_tokens < 1:
            raise QloraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise QloraError(f"logprobs must be in [0, 20], got {logprobs}")
        if not ids:
            raise QloraError("no prompts given")
        for x in ids:
            self._check_prompt(x)
        params = self.load_adapter(adapter) if adapter is not None else {}
        reqs = [Request(list(x), None, max_new_tokens, sampling, stop_strings(stop), logprobs, ignore_eos) for x in ids]
        return _Run(self, reqs, params)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise QloraError("the prompt has no tokens")
        if len(ids) >= self.meta.max_context:
            raise QloraError(f"--prompt is {len(ids)} tokens; this export's context is {self.meta.max_context} tokens")

    def _check_session(self) -> None:
        names = self.input_names
        want = {io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, *io.past_names(self.meta.layers)}
        missing = sorted(want - names)
        if missing:
            raise QloraError(f"{self.folder}: model.onnx does not match {manifest.NAME} (missing inputs "
                             f"{', '.join(missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''}); was the folder mixed from two exports?")


class _Run:
    """Requests decoded in the calling thread with the decode core (decode.py), as the serving engine decodes
    them: each prompt in its chunks, one row after another, then every unfinished row in each step. Iterate
    for (row, Event) as tokens are picked; `result` holds the completions at the end."""

    def __init__(self, model: Model, reqs: list[Request], params: dict) -> None:
        self.m, self.params = model, params
        capacity = min(model.meta.max_context, max(len(r.ids) + r.max_new_tokens for r in reqs))
        self.rows = Rows(model.session, model.input_names, model.meta, len(reqs), capacity)
        self.replies = [Reply(r, model.tokenizer, model.eos, capacity) for r in reqs]
        self.logprobs: list[list[dict]] = [[] for _ in reqs]
        self.result: list[Completion] = []

    def _take(self, i: int, logits: np.ndarray) -> Event | None:
        reply = self.replies[i]
        piece = reply.take(logits)
        if reply.finish == "error":
            raise QloraError(reply.error)
        if piece is not None:
            self.logprobs[i] += piece.logprobs
        return piece

    def __iter__(self) -> Iterator[tuple[int, Event]]:
        replies, params = self.replies, self.params
        t0 = time.perf_counter()
        for i, reply in enumerate(replies):
            ids = reply.req.ids
            for end, chunk in prompt_chunks(ids, 0, prompt_chunk(self.m.meta, len(ids))):
                logits = self.rows.run(i, np.array([chunk], np.int64), np.array([end], np.int64), params)
            if (piece := self._take(i, logits[0])) is not None:
                yield i, piece
        lengths = np.array([len(r.req.ids) for r in replies], np.int64)  # positions in each row's cache
        while live := [i for i, r in enumerate(replies) if not r.finish]:
            # one run over the rows first .. last still decoding (each alone where the export has no
            # row_lengths); a finished row between them writes its next position, never kept
            windows = [(live[0], live[-1] + 1)] if self.rows.per_row else [(i, i + 1) for i in live]
            for first, end in windows:
                ids = np.array([[r.tokens[-1] if r.tokens else 0] for r in replies[first:end]], np.int64)
                logits = self.rows.run(first, ids, lengths[first:end] + 1, params)
                for k in range(first, end):
                    if not replies[k].finish:
                        lengths[k] += 1
                        if (piece := self._take(k, logits[k - first])) is not None:
                            yield k, piece
        t_end = time.perf_counter()
        for reply, lps in zip(replies, self.logprobs):
            n, t_first = len(reply.tokens), reply.t_first or t_end
            self.result.append(Completion(reply.text.text, reply.tokens, reply.finish or "length", len(reply.req.ids),
                                          t_first - t0, (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first
                                          else 0.0, lps))


class Stream:
    """Text pieces of one completion as they are produced; a piece that might start a stop string is held back."""

    def __init__(self, model: Model, prompt, *, chat: bool = False, system: str | None = None, adapter=None,
                 **kw) -> None:
        """kw: as Model.generate's."""
        self._run = model._run([model.encode(prompt, chat, system)], adapter, **kw)
        self.result: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for _, piece in self._run:
            if piece.text:
                yield piece.text
        self.result = self._run.result[0]


def _special_tokens(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    return {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def _tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QloraError(f"{folder} has no tokenizer.json (the export writes one)")
    return Tokenizer.from_file(str(path))


def _chat_template(folder: Path) -> ChatTemplate | None:
    """The folder's chat template (compiled and rendered only when a prompt goes through it)."""
    path, cfg = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    source, where = (path.read_text(), path) if path.is_file() else (None, cfg)
    if source is None and cfg.is_file():
        source = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not source or not isinstance(source, str):
        return None
    return ChatTemplate(source, f"chat template ({where})")
