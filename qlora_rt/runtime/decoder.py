"""Offline inference on an exported folder with onnxruntime, numpy and tokenizers only (no torch).

    model = Model("runs/onnx")                       # model.onnx, tokenizer.json, qlora_rt_export.json
    model.generate("Rewrite 5 March 2021 as ISO 8601", chat=True, adapter="default")
    for piece in model.stream("Tell me a story", chat=True, temperature=0.7, seed=0): print(piece, end="")

The KV cache lives in one max-length buffer per layer, appended in place (kv_cache.py). Adapters are
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
from qlora_rt.runtime.kv_cache import KVCache
from qlora_rt.runtime.sampling import Sampling, stop_strings
from qlora_rt.runtime.session import adapter_names, file_signature, find_adapter, open_session, read_adapter_file
from qlora_rt.runtime.text import Text, held_back


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of text or a stop string) | "length"
    prompt_tokens: int
    ttft_s: float = 0.0  # prompt in -> first token out
    decode_tokens_per_s: float = 0.0  # the tokens after the first, per second


@dataclass
class _Row:
    text_state: Text | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None


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
        """Complete one prompt (-> Completion) or a list of them, batched with left padding (-> list).

        kw: adapter (name or path; None = the base), max_new_tokens=128, stop=(), temperature=0 (greedy),
        top_k=0, top_p=1, seed=None, presence_penalty=0, frequency_penalty=0, logit_bias=None ({token: bias}).
        """
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise QloraError("no prompts given")
        out = self.generate_ids([self.encode(p, chat, system) for p in batch], **kw)
        return out[0] if single else out

    def generate_ids(self, ids: list[list[int]], *, adapter: str | Path | None = None, max_new_tokens: int = 128,
                     stop: list[str] | tuple = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int | None = None, ignore_eos: bool = False, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None) -> list[Completion]:
        """Completions of token-id prompts; ignore_eos decodes exactly max_new_tokens (benchmarks)."""
        sampling = Sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias)
        steps = self._steps(ids, adapter, max_new_tokens, stop_strings(stop), sampling, ignore_eos=ignore_eos)
        for _ in steps:
            pass
        return steps.result

    def logits(self, ids: list[int], adapter: str | Path | None = None) -> np.ndarray:
        """(T, vocab) logits of one token sequence: the export self-check compares them with PyTorch's."""
        return self.logits_batch([ids], adapter)[0]

    def logits_batch(self, seqs: list[list[int]], adapter: str | Path | None = None) -> list[np.ndarray]:
        """(T_i, vocab) logits of each sequence, in one run over the left-padded batch."""
        out = self._steps(seqs, adapter, 1, (), Sampling(), all_logits=True).prompt()
        return [out[i, out.shape[1] - len(s):] for i, s in enumerate(seqs)]

    def stream(self, prompt: str | list[dict], **kw) -> Stream:
        """Like generate() for one prompt, but iterate to get the text as it is produced; .result at the end."""
        return Stream(self, prompt, **kw)

    def _steps(
        self,
        ids: list[list[int]],
        adapter,
        max_new: int,
        stop: tuple,
        sampling: Sampling,
        ignore_eos: bool = False,
        live_text: bool = False,
        all_logits: bool = False,
    ) -> _Steps:
        sampling.check()
        if max_new < 1:
            raise QloraError(f"--max-new-tokens must be at least 1, got {max_new}")
        longest, ctx = max(len(x) for x in ids), self.meta.max_context
        if longest >= ctx:
            raise QloraError(f"--prompt is {longest} tokens; this export's context is {ctx} tokens")
        params = self.load_adapter(adapter) if adapter is not None else {}
        return _Steps(self, ids, params, min(max_new, ctx - longest), stop, sampling,
                      set() if ignore_eos else self.eos, live_text or bool(stop), all_logits)

    def _check_session(self) -> None:
        names = self.input_names
        want = {io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, *io.past_names(self.meta.layers)}
        missing = sorted(want - names)
        if missing:
            raise QloraError(f"{self.folder}: model.onnx does not match {manifest.NAME} (missing inputs "
                             f"{', '.join(missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''}); was the folder mixed from two exports?")


class _Steps:
    """The decode loop as an iterator: each step yields the batch's new tokens (B,), until all rows finish.

    live_text: keep each row's text decoded as it grows (streaming, stop strings); otherwise the text
    is decoded once at the end, off the per-token path."""

    def __init__(self, model: Model, ids: list[list[int]], adapter: dict, max_new: int, stop: tuple,
                 sampling: Sampling, eos: set[int], live_text: bool, all_logits: bool = False):
        self.m, self.max_new, self.stop, self.sampling = model, max_new, stop, sampling
        self.eos, self.live_text = eos, live_text
        self.prompt_lens = [len(x) for x in ids]
        width = max(self.prompt_lens)
        self.ids = np.array([[model.pad] * (width - len(x)) + x for x in ids], np.int64)  # (B, T) left-padded
        self.mask = np.array([[0] * (width - len(x)) + [1] * len(x) for x in ids], np.int64)  # (B, T)
        self.positions = np.maximum(np.cumsum(self.mask, 1) - 1, 0)  # (B, T): pads share position 0
        self.rows = [_Row() for _ in ids]
        self.rng = np.random.default_rng(sampling.seed)
        self.result: list[Completion] = []
        self.binding = self._bind(adapter, width + max_new)
        if not all_logits and io.LOGITS_TO_KEEP in model.input_names:  # exports before it compute every position's
            # the last position only (an overridable input: bind_cpu_input does not find those, so the value
            # is bound as an OrtValue, kept alive with the binding)
            self._keep = ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64))
            self.binding.bind_ortvalue_input(io.LOGITS_TO_KEEP, self._keep)

    def _bind(self, adapter: dict, capacity: int):
        """Outputs first (logits is output 0), then the cache (kv_cache.py: appended in place)."""
        meta, b = self.m.meta, len(self.rows)
        binding = self.m.session.io_binding()
        binding.bind_output(io.LOGITS)
        self.kv = KVCache(meta, b, capacity)
        self.kv.bind(binding)
        for name, value in adapter.items():
            binding.bind_ortvalue_input(name, value)
        logits = np.empty((b, 1, meta.vocab), np.float32)
        self._step_logits = logits, ort.OrtValue.ortvalue_from_numpy(logits)
        self._into_buffer = False  # True once the prompt ran: each step's logits land in _step_logits
        return binding

    def run(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step over ids (B, T) at positions (B, T), the mask already covering them: logits (B, T, V)."""
        b = self.binding
        b.bind_cpu_input(io.INPUT_IDS, ids)
        b.bind_cpu_input(io.ATTENTION_MASK, self.mask)
        b.bind_cpu_input(io.POSITION_IDS, positions)
        self.m.session.run_with_iobinding(b)
        return self._step_logits[0] if self._into_buffer else b.get_outputs()[0].numpy()

    def prompt(self) -> np.ndarray:
        """The prompt's logits (B, 1, V), or (B, T, V) with all_logits, into an array onnxruntime allocates;
        decoding steps after it write theirs into a (B, 1, V) buffer of our own, bound once here, not a
        fresh array a step."""
        logits = self.run(self.ids, self.positions)
        self.binding.bind_ortvalue_output(io.LOGITS, self._step_logits[1])
        self._into_buffer = True
        return logits

    def __iter__(self) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        logits = self.prompt()
        positions, t_first = self.positions, None
        for step in range(self.max_new):
            last = logits[:, -1]
            if self.sampling.adjusts:
                last = np.stack([self.sampling.adjust(z, row.tokens) for z, row in zip(last, self.rows)])
            tokens = self.sampling.pick(last, self.rng)  # (B,)
            t_first = t_first or time.perf_counter()
            self._record(tokens, step + 1 == self.max_new)
            yield tokens
            if all(r.finish for r in self.rows):
                break
            positions = positions[:, -1:] + 1  # (B, 1)
            self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], 1)
            logits = self.run(tokens[:, None].astype(np.int64), positions)
        t_end = time.perf_counter()
        for row, n_prompt in zip(self.rows, self.prompt_lens):
            n = len(row.tokens)
            if not self.live_text:
                row.text = self.m.tokenizer.decode(row.tokens)
            self.result.append(Completion(row.text, row.tokens, row.finish or "length", n_prompt, t_first - t0,
                                          (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0))

    def _record(self, tokens: np.ndarray, last: bool) -> None:
        for row, t in zip(self.rows, tokens.tolist()):
            if row.finish:
                continue
            if t in self.eos:
                row.finish = "stop"  # as OpenAI's API says it: the model ended its text (or a stop string did)
                continue
            row.tokens.append(t)
            if self.live_text:
                row.text_state = row.text_state or Text(self.m.tokenizer, self.stop)
                stopped = row.text_state.add(t)
                row.text = row.text_state.text
                if stopped:
                    row.finish = "stop"
                    continue
            if last:
                row.finish = "length"


class Stream:
    """Text pieces of one completion as they are produced; a piece that might start a stop string is held back."""

    def __init__(self, model: Model, prompt, *, chat: bool = False, system: str | None = None, adapter=None,
                 max_new_tokens: int = 128, stop=(), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None) -> None:
        self.stop = stop_strings(stop)
        sampling = Sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias)
        self._steps = model._steps([model.encode(prompt, chat, system)], adapter, max_new_tokens, self.stop,
                                   sampling, live_text=True)
        self.result: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        sent, row = 0, self._steps.rows[0]
        for _ in self._steps:
            text = row.text
            if not row.finish:
                if text.endswith("\ufffd"):  # a multi-byte character still incomplete
                    continue
                text = text[: len(text) - held_back(text, self.stop)]
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        self.result = self._steps.result[0]


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
