"""Continuous batching over one decoder export: many independent streams, each with its own adapter.

The engine owns one KV cache of `max_batch` rows (slots). A request takes a free slot, its prompt is
run into that slot's cache one chunk a round (between decode steps, so running streams wait at most one
chunk), and from then on it is one row of every decode step until it finishes; then the slot is free for
the next one, and what its cache holds stays there for a request that starts the same way (the prefix
cache: `_slot_for`).

A reply depends on its request alone, not on what the cache held or what else ran: a prompt is always run
in the same chunks, `prefill_chunk` positions each from position 0 (a chunk's products and attention then
see the same rows however the prompt arrived), and the prefix cache keeps and reuses whole chunks of a
prompt only, never the positions a decode step wrote (those were computed a row at a time, in another
order). Every product whose rows could round differently with their number (onnxruntime's fp32 sgemm on
one row takes another path than on several) then sees the same rows; the int4 products with int8
activations are row-for-row the same at any batch size.
Rows are right-aligned: each holds its own number of positions from 0 (the graph's `row_lengths`), so
streams of any lengths share a step without padding, and a finished row leaves nothing to compact.

Rows with different adapters share each step: the adapters present in the step are fed stacked along
their ranks (A and B), and each group's `lora_mask` (rows, R) keeps each row to its own adapter's columns
(export/weight_writers.py `_lora`); base rows keep none. A step whose rows all share one adapter feeds it
alone, as `Model.generate` does.
A graph without per-row adapter inputs (a merged export: no LoRA inputs at all) batches only rows of one
adapter at a time, which for a merged export is every row.

The runs themselves and each row's token choice, finish and text are the decode core's (decode.py: `Rows`,
`Reply`), which `Model.generate` runs too; the engine decides what runs when.

The engine runs in one thread of its own; onnxruntime releases the GIL while a step runs. Callers hand
it a `Request` and an `emit` callable that receives the request's `Event`s from the engine's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from qlora_rt.errors import QloraError
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.decode import PREFILL_CHUNK, Event, Reply, Request, Rows, prompt_chunk
from qlora_rt.runtime.decoder import Model
from qlora_rt.runtime.session import a_rank_axis, release_memory

STOPPING = "the server is shutting down; retry on another"
STACKS = 2  # sets of adapters kept stacked (each a copy of its adapters' tensors), least recently used dropped


class QueueFull(QloraError):
    """More rows wait than the engine queues; the caller should retry later."""


class ShuttingDown(QloraError):
    """The engine takes no more requests: the server is stopping."""


class _Live:
    """A request in the engine: its slot, how much of its prompt is in the cache, and its reply."""

    def __init__(self, req: Request, emit: Callable[[Event], None], params: dict, reply: Reply) -> None:
        self.req, self.emit, self.params, self.reply = req, emit, params, reply
        self.chunk = 0                # prompt positions a run (decode.prompt_chunk)
        self.slot = -1
        self.done_prompt = 0          # prompt tokens already in the cache
        self.length = 0               # positions in the cache
        self.next_token: int | None = None  # picked, not yet in the cache
        self.cancelled = False
        self.finished = False
        self.t_submit = time.perf_counter()

    @property
    def tokens(self) -> list[int]:
        return self.reply.tokens


class Engine:
    def __init__(self, model: Model, max_batch: int = 8, max_seq_len: int = 2048, prefill_chunk: int = PREFILL_CHUNK,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 0:
            raise QloraError("--max-batch and the prefill chunk must be at least 1, the queue at least 0")
        meta = model.meta
        self.m, self.max_batch, self.prefill_chunk, self.max_queue = model, max_batch, prefill_chunk, max_queue
        self.capacity = min(max_seq_len, meta.max_context)
        if self.capacity < 2:
            raise QloraError(f"--max-seq-len {max_seq_len}: must be at least 2")
        if io.ROW_LENGTHS not in model.input_names:
            raise QloraError(f"{model.folder} was exported before the graph took per-row cache lengths; export it "
                             "again with this qlora-rt to serve it")
        # an adapter-aware export takes a mask per group (one from before them batches one adapter at a time)
        self.mixed = any(n.endswith(io.LORA_MASK) for n in model.input_names)
        self.rows = Rows(model.session, model.input_names, meta, max_batch, self.capacity)
        self._stacks: dict[tuple[int, ...], tuple] = {}  # adapter sets fed stacked, and their column slots
        self.adapters: dict[str, dict[str, ort.OrtValue]] = {}
        self._base: dict[str, ort.OrtValue] = {}  # the base's LoRA inputs: none (one object, shared by its rows)
        self.slots: list[_Live | None] = [None] * max_batch
        # the prefix cache: what each slot's KV cache holds once its request has left (the tokens at positions
        # 0.., and the adapter they were computed with), reused by the next request that starts the same way
        self.held: list[tuple[object, list[int]]] = [(None, [])] * max_batch
        self.last_used = [0.0] * max_batch  # when each slot last took a request: the least recent is reused first
        self.prefix_tokens = 0  # prompt tokens taken from the cache instead of run (since start)
        # observers (the server's metrics): a decode step's seconds; a row's adapter and its time to first token
        self.on_step: Callable[[float], None] | None = None
        self.on_first_token: Callable[[str | None, float], None] | None = None
        self.waiting: deque[_Live] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self._removed = False  # an adapter was unloaded: stacks holding it are dropped once no row uses it
        self._unloaded: list[dict] = []  # adapters unloaded whose windows are not yet forgotten (_purge)
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="qlora-rt-engine", daemon=True)
        self.thread.start()

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, name_or_path) -> None:
        """Load (and check) an adapter under a name; requests already running keep the one they started with."""
        params = self.m.load_adapter(name_or_path, keep=False)  # held here only: unloading frees it
        with self.cond:
            self.adapters[name] = params

    def remove_adapter(self, name: str) -> None:
        """Unknown to new requests at once; running requests that use it finish with it (they hold it), and
        its memory is freed when the last of them has (stacked copies included: _purge)."""
        with self.cond:
            self._unloaded.append(self.adapters.pop(name))
            self._removed = True
            self.cond.notify()

    # ---- requests ----------------------------------------------------------------------------------
    def submit(self, req: Request, emit: Callable[[Event], None]) -> _Live:
        return self.submit_many([req], [emit])[0]

    def submit_many(self, reqs: list[Request], emits: list[Callable[[Event], None]]) -> list[_Live]:
        """Several rows (one request's prompts x n) queued together or not at all: a request never holds more
        than the queue's room, counted in rows (--max-queue waiting beside --max-batch running)."""
        for req in reqs:
            if not req.ids:
                raise QloraError("the prompt is empty")
            if len(req.ids) >= self.capacity:
                raise QloraError(f"the prompt is {len(req.ids)} tokens; this server's context is {self.capacity} "
                                 "tokens (--max-seq-len)")
            if req.max_new_tokens < 1:
                raise QloraError(f"max_tokens must be at least 1, got {req.max_new_tokens}")
            req.sampling.check(self.m.meta.vocab)
        most = self.max_queue + self.max_batch
        if len(reqs) > most:
            raise QloraError(f"this request decodes {len(reqs)} rows (prompts x n); this server takes at most {most} "
                             "at once (--max-queue + --max-batch)")
        with self.cond:
            if self.closing:
                raise ShuttingDown(STOPPING)
            for req in reqs:
                if req.adapter is not None and req.adapter not in self.adapters:
                    raise QloraError(f"no adapter named {req.adapter!r} is loaded")
            busy = sum(s is not None for s in self.slots)
            room = self.max_queue + self.max_batch - busy - len(self.waiting)
            if len(reqs) > room:
                raise QueueFull(f"{busy} rows are decoding and {len(self.waiting)} waiting (--max-batch "
                                f"{self.max_batch}, --max-queue {self.max_queue}); this request needs {len(reqs)}: "
                                "retry shortly")
            lives = [_Live(req, emit, self.adapters[req.adapter] if req.adapter is not None else self._base,
                           Reply(req, self.m.tokenizer, self.m.eos, self.capacity)) for req, emit in zip(reqs, emits)]
            for live in lives:
                live.chunk = prompt_chunk(self.m.meta, len(live.req.ids), self.prefill_chunk)
            self.waiting.extend(lives)
            self.cond.notify()
        return lives

    def cancel(self, live: _Live) -> None:
        """Free the request's row at the next step (a client that went away)."""
        live.cancelled = True
        with self.cond:
            self.cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Take no more requests and end the waiting ones at once; let the running ones finish (up to timeout),
        end those still running with an error event, then stop the thread. Every request hears how it ended."""
        with self.cond:
            self.closing = True
            for live in self.waiting:
                self._finish(live, "error", STOPPING, "shutting_down")
            self.waiting.clear()
            self.cond.notify()
        self.thread.join(timeout)
        with self.cond:
            for live in filter(None, self.slots):
                live.cancelled = True
                self._finish(live, "error", "the server stopped before this request finished", "shutting_down")
            self.slots = [None] * self.max_batch
            self.cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting)."""
        return sum(s is not None for s in self.slots), len(self.waiting)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                self._drop_cancelled()
                self._purge()
                self._admit()
                active = [s for s in self.slots if s is not None]
                if not active:
                    if self.closing:
                        return
                    self.cond.wait()
                    continue
            try:
                prefilling = [s for s in active if s.done_prompt < len(s.req.ids)]
                if prefilling:  # one chunk of one prompt per round: running streams wait at most one chunk
                    self._prefill(min(prefilling, key=lambda s: s.t_submit))
                decoding = [s for s in active if s.next_token is not None and not s.finished]
                if decoding:
                    self._decode(decoding)
            except Exception as e:  # onnxruntime failed: every request in the step gets the reason, not a hang
                message = f"the model failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                with self.cond:
                    for live in active:
                        self._finish(live, "error", message)
                        live.length = 0  # what its slot holds is not known: nothing is kept for reuse
            with self.cond:
                for i, live in enumerate(self.slots):
                    if live is not None and live.finished:
                        self._leave(i, live)

    def _drop_cancelled(self) -> None:
        self.waiting = deque(w for w in self.waiting if not w.cancelled)
        for i, live in enumerate(self.slots):
            if live is not None and live.cancelled:
                live.finished = True
                self._leave(i, live)

    def _leave(self, slot: int, live: _Live) -> None:
        """A finished request frees its slot; the whole prompt chunks its cache holds stay there for a request
        with the same start (a last partial chunk and the reply's positions are run again by the next one:
        run as a whole chunk, they would round otherwise)."""
        self.slots[slot] = None
        whole = min(live.done_prompt, live.length) // self.prefill_chunk * self.prefill_chunk
        if live.chunk != self.prefill_chunk:  # run whole (LongRoPE's long tables): no chunk of it is another's
            whole = 0
        self.held[slot] = (live.params, live.req.ids[:whole])

    def _purge(self) -> None:
        """Drop the stacked copies of adapters that are neither loaded nor used by a row any more."""
        if not self._removed:
            return
        loaded = {id(p) for p in self.adapters.values()}
        rows = [*filter(None, self.slots), *self.waiting]
        used = loaded | {id(r.params) for r in rows}
        for k in [k for k in self._stacks if not all(i in used for i in k)]:
            self.rows.forget(self._stacks.pop(k)[0].values())
        for p in self._unloaded:  # rows' windows that last ran with an adapter now gone
            if id(p) not in used:
                self.rows.forget(p.values())
        self._unloaded = [p for p in self._unloaded if id(p) in used]
        self.held = [(p, h) if p is None or id(p) in used else (None, []) for p, h in self.held]
        self._removed = any(r.params and id(r.params) not in loaded for r in rows)  # purge again when they end
        if not self._removed:
            release_memory()

    def _admit(self) -> None:
        """Waiting requests into free slots, oldest first (each into the slot `_slot_for` picks). An export
        without per-row adapters takes only requests of the running rows' adapter."""
        running = {id(s.params) for s in self.slots if s is not None}
        for _ in range(self.slots.count(None)):
            if not self.waiting:
                return
            pick = 0
            if not self.mixed and running:
                pick = next((k for k, w in enumerate(self.waiting) if id(w.params) in running), None)
                if pick is None:
                    return
            live = self.waiting[pick]
            del self.waiting[pick]
            i = self._slot_for(live)
            running.add(id(live.params))
            self.slots[i] = live

    def _slot_for(self, live: _Live) -> int:
        """The free slot whose held tokens (same adapter) share the longest start with the prompt: those positions,
        in whole chunks, are not run again (at least the prompt's last token is, for its logits). Without one,
        the slot used least recently, so recent prefixes stay."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        ids = live.req.ids

        def shared(i: int) -> int:
            params, held = self.held[i]
            if params is not live.params or not held:
                return 0
            n = min(len(held), len(ids) - 1)
            a, b = np.asarray(held[:n]), np.asarray(ids[:n])
            differ = np.flatnonzero(a != b)
            return int(differ[0]) if differ.size else n
        c = self.prefill_chunk
        best = max(free, key=lambda i: (shared(i) // c if live.chunk == c else 0, -self.last_used[i]))
        reuse = shared(best) // c * c if live.chunk == c else 0
        live.slot, live.done_prompt, live.length = best, reuse, reuse
        self.prefix_tokens += reuse
        self.held[best] = (None, [])  # from here the slot's cache is this request's
        self.last_used[best] = time.perf_counter()
        return best

    def _prefill(self, live: _Live) -> None:
        """The prompt's next chunk: positions k*C .. (k+1)*C-1 (done_prompt is always a multiple of C)."""
        ids = live.req.ids[live.done_prompt: live.done_prompt + live.chunk]
        live.length = live.done_prompt + len(ids)
        logits = self.rows.run(live.slot, np.array([ids], np.int64), np.array([live.length], np.int64), live.params)
        live.done_prompt = live.length
        if live.done_prompt == len(live.req.ids):
            self._take(live, logits[0])

    def _decode(self, rows: list[_Live]) -> None:
        first, last = min(r.slot for r in rows), max(r.slot for r in rows)
        n = last - first + 1
        ids = np.zeros((n, 1), np.int64)
        lengths = np.ones(n, np.int64)
        for r in rows:
            ids[r.slot - first, 0] = r.next_token
            lengths[r.slot - first] = r.length + 1
        for i in range(n):  # a slot not decoding writes one throwaway position where nothing is kept:
            other = self.slots[first + i]
            if other is None:  # a free slot: just past the tokens it holds for reuse
                params, held = self.held[first + i]
                keep = min(len(held), self.capacity - 1)
                self.held[first + i] = (params, held[:keep])
                lengths[i] = keep + 1
            elif other not in rows:  # a row still in its prompt: where its next chunk will write
                lengths[i] = other.length + 1
        t0 = time.perf_counter()
        logits = self.rows.run(first, ids, lengths, self._lora(rows, first, n))
        self.steps += 1
        if self.on_step is not None:
            self.on_step(time.perf_counter() - t0)
        for r in rows:
            r.length += 1
            r.next_token = None
            self._take(r, logits[r.slot - first])

    def _lora(self, rows: list[_Live], first: int, n: int) -> dict[str, ort.OrtValue]:
        """The LoRA inputs of a step: one adapter's own when the rows share it, else the present adapters
        stacked with each group's mask of each row's columns."""
        sets = {id(r.params): r.params for r in rows}
        if len(sets) == 1:
            return next(iter(sets.values()))
        # one order for a set, whatever its rows' order: the same adapters make one stacked copy, not one an order
        present = sorted((p for p in sets.values() if p), key=id)
        key = tuple(id(p) for p in present)
        if key in self._stacks:
            self._stacks[key] = self._stacks.pop(key)  # most recently used last
        else:
            while len(self._stacks) >= STACKS:
                self.rows.forget(self._stacks.pop(next(iter(self._stacks)))[0].values())
            meta = self.m.meta
            self._stacks[key] = (*_stack(present, meta.lora_groups, a_rank_axis(meta.lora_inputs)),
                                 present)  # `present` pins the ids
        stacked, layouts, _ = self._stacks[key]
        slot_of = {id(p): k + 1 for k, p in enumerate(present)}
        slots = np.zeros(n, np.int64)
        for r in rows:
            slots[r.slot - first] = slot_of.get(id(r.params), 0)
        extra = {}
        for columns, groups in layouts:  # one (rows, R) mask per column layout, shared by its groups
            mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(slots[:, None] == columns[None], np.float32))
            extra.update((g + io.LORA_MASK, mask) for g in groups)
        self._step_inputs = extra  # kept alive while the step runs
        return {**stacked, **extra}

    def _take(self, live: _Live, logits: np.ndarray) -> None:
        """The row's next token (decode.Reply): its text emitted, and the token fed at the next step unless
        the reply is done."""
        if live.cancelled:
            live.finished = True
            return
        reply = live.reply
        piece = reply.take(logits, f" (adapter {live.req.adapter!r})" if live.req.adapter else "")
        if piece is not None:
            if len(reply.tokens) == 1 and self.on_first_token is not None:
                self.on_first_token(live.req.adapter, time.perf_counter() - live.t_submit)
            live.emit(piece)
        if reply.finish:
            self._finish(live, reply.finish, reply.error)
        else:
            live.next_token = reply.tokens[-1]

    def _finish(self, live: _Live, reason: str, error: str | None = None, code: str | None = None) -> None:
        if live.finished:
            return
        live.finished = True
        live.emit(Event(finish=reason, error=error, code=code, prompt_tokens=len(live.req.ids),
                        completion_tokens=len(live.tokens)))


def _stack(adapters: list[dict[str, ort.OrtValue]], groups: dict[str, list], a_axis: int = 0
           ) -> tuple[dict[str, ort.OrtValue], list[tuple[np.ndarray, list[str]]]]:
    """Several adapters as one set of LoRA inputs: each group's A and B stacked along their ranks (A's on
    `a_axis`: session.a_rank_axis; B's on 0), and the slot (1-based, in list order) of every rank column of
    x·Aᵀ, once per column layout with the groups that have it; groups none of them adapts keep their
    defaults. A group with a B per member (`groups`: the export's lora_groups) keeps its A's ranks in member
    blocks: member j's block is every adapter's j-th block, stacked, and B_j stacks theirs."""
    out: dict[str, np.ndarray] = {}
    layouts: dict[bytes, tuple[np.ndarray, list[str]]] = {}
    for g in {k[: -len(".lora_A")] for a in adapters for k in a if k.endswith(".lora_A")}:
        having = [(k + 1, a) for k, a in enumerate(adapters) if f"{g}.lora_A" in a]
        if f"{g}.lora_B" in having[0][1]:  # one B over the group's outputs side by side
            bs = [f"{g}.lora_B"]
        else:  # a B per member: each adapter's A is one equal block of columns per member
            bs = [f"{m}.lora_B" for m, _ in groups[g]]
        parts = {slot: np.split(a[f"{g}.lora_A"].numpy(), len(bs), axis=a_axis) for slot, a in having}
        blocks = [(slot, parts[slot][j]) for j in range(len(bs)) for slot, _ in having]  # member-major
        out[f"{g}.lora_A"] = np.concatenate([a for _, a in blocks], a_axis)
        for b in bs:
            out[b] = np.concatenate([a[b].numpy() for _, a in having], 0)
        columns = np.concatenate([np.full(a.shape[a_axis], slot, np.int64) for slot, a in blocks])
        layouts.setdefault(columns.tobytes(), (columns, []))[1].append(g)
    return ({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in out.items()},
            list(layouts.values()))


__all__ = ["Engine", "Event", "QueueFull", "Request", "ShuttingDown"]
