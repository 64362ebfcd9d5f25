"""The serving engine's prefix cache: a request that starts as a finished one did (same adapter) takes those
positions, in whole prompt chunks, from the slot's KV cache instead of running them, and decodes exactly what
it decodes uncached, log-probabilities bit for bit; and a reply that depends on nothing but its request."""

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
        shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)  # then they differ
        held = len(prompts[0]) // 4 * 4  # the first request's whole chunks
        assert reused == [0, min(shared, held) // 4 * 4, (len(prompts[2]) - 1) // 4 * 4] and reused[1] > 5, reused
    finally:
        engine.close(5)


def test_a_prefix_is_reused_only_with_the_adapter_it_was_computed_with(model):
    prompt = model.encode(SHARED + "one two")
    want = {a: model.generate_ids([prompt], adapter=a, max_new_tokens=6, ignore_eos=True)[0].tokens
            for a in (None, "a")}
    assert want[None] != want["a"]
    engine = Engine(model, max_batch=1, prefill_chunk=4)
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
    engine = Engine(model, max_batch=3, prefill_chunk=4)
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
        assert engine.prefix_tokens - before == (len(held) - 1) // 4 * 4 > 0
        fresh = Engine(model, max_batch=1, prefill_chunk=4)
        uncached = []
        try:
            assert again == _tokens(fresh, held, scores=uncached)
        finally:
            fresh.close(5)
        assert cached == uncached
    finally:
        engine.close(5)


@pytest.fixture(scope="module")
def int4_export(tiny_data, tmp_path_factory):
    """The default export of an int4-trained base (4-bit products with int8 activations) with adapters a (r4,
    all-linear) and b (r8, q/v): what `qlora-rt export` writes when given no options. SmolLM2-135M's widths
    (576, 1536; 9 heads of 64) in 6 layers, adapters trained hard: at the tiny model's widths, or with
    small LoRA terms in 2 layers, a graph whose rows' LoRA terms depend on the batch passed (int8
    activations round most such differences away; 16 tokens a reply give them room to show)."""
    from conftest import save_checkpoint

    from qlora_rt.cli import main
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.runtime import manifest

    tmp = tmp_path_factory.mktemp("int4")
    base = save_checkpoint(tmp / "base", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, head_dim=64, num_hidden_layers=6)
    runs = {name: train_run(base, tiny_data, tmp / name, rank, targets, seed)
            for name, rank, targets, seed in (("a", 4, "all-linear", 0), ("b", 8, "q_proj,v_proj", 1))}
    out = tmp / "export"
    export(ExportConfig(model=str(base), adapter=str(runs["a"]), out=str(out), name="a"))
    assert main(["export-adapter", "--adapter", str(runs["b"]), "--onnx", str(out), "--name", "b"]) == 0
    assert manifest.read(out).int4_activations == "int8"
    return out


def train_run(model, data, out, rank, targets, seed):
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    return train(TrainConfig(model=str(model), data=str(data / "train.jsonl"), out=str(out), quant="int4", steps=6,
                             rank=rank, targets=targets, seed=seed, lr=5e-2, batch_size=2, seq_len=64,
                             checkpoint_every=0, eval_every=0)).adapter


def _replies(engine: Engine, rows: list[tuple[list[int], str | None]], new: int = 16) -> list[tuple[list, list]]:
    """Each row's greedy tokens and their log-probabilities (and the 3 runners-up's), all submitted at once."""
    queues = []
    for ids, adapter in rows:
        queues.append(queue.Queue())
        engine.submit(Request(ids, adapter, new, ignore_eos=True, logprobs=3), queues[-1].put)
    out = []
    for q in queues:
        tokens, scores = [], []
        while True:
            ev = q.get(timeout=60)
            tokens += ev.tokens
            scores += [(lp["logprob"], lp["top"]) for lp in ev.logprobs]
            if ev.finish:
                assert ev.finish != "error", ev.error
                break
        out.append((tokens, scores))
    return out


def test_a_reply_depends_on_its_request_alone_not_on_the_cache_or_the_batch(int4_export):
    """The same greedy request alone on a fresh engine, after other requests that left a shared start in the
    cache, and as one of 8 rows over the base and two adapters in one batch: the same tokens and the same
    log-probabilities, bit for bit, on the default export (int8 activations)."""
    m = Model(int4_export)
    adapters = [None, "a", "b", None, "a", "b", "a", None]
    prompts = [m.encode(SHARED * 2 + end) for end in ("one", "two three", "four", "five six seven", "eight",
                                                        "nine ten", "eleven", "twelve thirteen")]

    def engine() -> Engine:
        e = Engine(m, max_batch=8, prefill_chunk=8)
        for name in ("a", "b"):
            e.add_adapter(name, name)
        return e

    alone = []
    for row in zip(prompts, adapters):
        e = engine()
        try:
            alone += _replies(e, [row])
        finally:
            e.close(5)
    e = engine()
    try:
        cached = [_replies(e, [row])[0] for row in zip(prompts, adapters)]  # one after another: shared starts
        assert e.prefix_tokens >= 5 * 8, e.prefix_tokens
    finally:
        e.close(5)
    e = engine()
    try:
        batch = _replies(e, list(zip(prompts, adapters)))
    finally:
        e.close(5)
    assert len({tuple(t) for t, _ in alone}) > 2, "the adapters and prompts give different replies"
    assert cached == alone
    assert batch == alone
    # `Model.generate` runs the same decode core in the calling thread: at the engine's default chunk, its
    # replies, the 8 rows side by side over one adapter each, are the engine's batch of 8 mixed rows
    e = Engine(m, max_batch=8)
    for name in ("a", "b"):
        e.add_adapter(name, name)
    try:
        served = _replies(e, list(zip(prompts, adapters)))
    finally:
        e.close(5)
    generated = [None] * len(prompts)
    for adapter in (None, "a", "b"):
        rows = [i for i, a in enumerate(adapters) if a == adapter]
        for i, c in zip(rows, m.generate_ids([prompts[i] for i in rows], adapter=adapter, max_new_tokens=16,
                                             ignore_eos=True, logprobs=3)):
            generated[i] = (c.tokens, [(lp["logprob"], lp["top"]) for lp in c.logprobs])
    assert generated == served
