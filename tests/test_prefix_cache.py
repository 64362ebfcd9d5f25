"""The serving engine's prefix cache: a request that starts as a finished one did (same adapter) takes those
positions from the slot's KV cache instead of running them, and decodes exactly what it decodes uncached."""

import queue

import pytest

from qlora_rt.runtime import Model
from qlora_rt.runtime.batching import Engine, Request

SHARED = "the history of the written date is long and the cat sat on the mat while "


def _tokens(engine: Engine, ids: list[int], adapter=None, new: int = 6, scores: list | None = None) -> list[int]:
    """The greedy tokens; `scores` gets each one's log-probability (which a corrupted cache would move)."""
    q: queue.Queue = queue.Queue()
    engine.submit(Request(ids, adapter, new, ignore_eos=True, logprobs=0), q.put)
    tokens = []
    while True:
        ev = q.get(timeout=60)
        tokens += ev.tokens
        if scores is not None:
            scores += [lp["logprob"] for lp in ev.logprobs]
        if ev.finish:
            assert ev.finish != "error", ev.error
            return tokens


@pytest.fixture(scope="module")
def model(tiny_export):
    return Model(tiny_export)


def test_a_shared_start_is_taken_from_the_cache_and_decodes_as_uncached(model):
    prompts = [model.encode(SHARED + end) for end in ("one two", "three four five", "three four five")]
    alone = [model.generate_ids([p], max_new_tokens=6, ignore_eos=True)[0].tokens for p in prompts]
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    try:
        got, reused = [], []
        for p in prompts:
            before = engine.prefix_tokens
            got.append(_tokens(engine, p))
            reused.append(engine.prefix_tokens - before)
        assert got == alone
        shared = sum(1 for a, b in zip(prompts[0], prompts[1]) if a == b)  # a common start, then they differ
        assert reused[0] == 0 and reused[1] >= shared - 1 > 5 and reused[2] == len(prompts[2]) - 1, reused
    finally:
        engine.close(5)


def test_a_prefix_is_reused_only_with_the_adapter_it_was_computed_with(model):
    prompt = model.encode(SHARED + "one two")
    want = {a: model.generate_ids([prompt], adapter=a, max_new_tokens=6, ignore_eos=True)[0].tokens
            for a in (None, "a")}
    assert want[None] != want["a"]
    engine = Engine(model, max_batch=1)
    try:
        engine.add_adapter("a", "a")
        assert _tokens(engine, prompt, "a") == want["a"]
        before = engine.prefix_tokens
        assert _tokens(engine, prompt, None) == want[None] and engine.prefix_tokens == before  # another adapter
        assert _tokens(engine, prompt, None) == want[None] and engine.prefix_tokens > before   # the same
    finally:
        engine.close(5)


def test_steps_of_other_rows_do_not_overwrite_a_held_prefix(model):
    """A free slot between two decoding rows takes a throwaway position each step: past what it holds."""
    engine = Engine(model, max_batch=3, prefill_chunk=64)
    long = model.encode("count to ten slowly")
    held = model.encode(SHARED + "five")
    try:
        queues = [queue.Queue() for _ in range(3)]
        for q, (ids, new) in zip(queues, ((long, 24), (held, 1), (long, 24))):  # slots 0, 1, 2
            engine.submit(Request(ids, None, new, ignore_eos=True), q.put)
        for q in queues:
            while not q.get(timeout=60).finish:
                pass
        before, cached = engine.prefix_tokens, []
        again = _tokens(engine, held, scores=cached)
        assert engine.prefix_tokens - before == len(held) - 1
        fresh = Engine(model, max_batch=1)
        uncached = []
        try:
            assert again == _tokens(fresh, held, scores=uncached)
        finally:
            fresh.close(5)
        assert max(abs(a - b) for a, b in zip(cached, uncached)) < 1e-4, (cached, uncached)
    finally:
        engine.close(5)
