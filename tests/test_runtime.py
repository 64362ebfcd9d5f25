"""The torch-free runtime on a tiny export: same tokens as PyTorch, seeded sampling, adapters per call, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qlora_rt.cli import main
from qlora_rt.config import ChatConfig
from qlora_rt.errors import QloraError
from qlora_rt.runtime import manifest

PROMPTS = ["what is the capital of france?", "count to five", "hello"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def runtime(exported):
    from qlora_rt.runtime import Model

    return Model(exported)


def _torch_greedy(tiny_llama, adapter, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    from qlora_rt.trained import open_trained

    loaded, _, _ = open_trained(str(tiny_llama), str(adapter) if adapter else None, "nf4")  # tiny_export's base
    x = torch.tensor([prompt_ids])
    eos = loaded.tokenizer.eos_token_id
    with torch.no_grad():
        seq = loaded.model.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                           eos_token_id=eos, pad_token_id=eos)[0, x.shape[1]:].tolist()
    return seq[: seq.index(eos)] if eos in seq else seq


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_greedy_equals_pytorch_and_batching_changes_nothing(tiny_llama, tiny_runs, runtime, adapter):
    _, adapters = tiny_runs
    singles = [runtime.generate(p, chat=True, adapter=adapter, max_new_tokens=16) for p in PROMPTS]
    for prompt, got in zip(PROMPTS, singles):
        ids = runtime.encode(prompt, chat=True)
        assert got.prompt_tokens == len(ids)
        assert got.tokens == _torch_greedy(tiny_llama, adapters[adapter] if adapter else None, ids, 16), prompt
    assert sum(len(c.tokens) for c in singles) >= 12  # real continuations, not an immediate end
    batch = runtime.generate(PROMPTS, chat=True, adapter=adapter, max_new_tokens=16)  # left-padded, one run
    assert [c.tokens for c in batch] == [c.tokens for c in singles]


def test_logits_to_keep_computes_only_the_last_positions(exported, runtime):
    """A prompt needs only its last position's logits: `logits_to_keep` N gives exactly the last N rows of
    the full (B, T, V) logits, 0 (the default) gives them all; the runtime binds 1, its self-check 0."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = runtime.meta
    T = 6
    feed = {"input_ids": np.array([[5, 9, 17, 33, 2, 41]], np.int64), "attention_mask": np.ones((1, T), np.int64),
            "position_ids": np.arange(T, dtype=np.int64)[None]}
    for i in range(meta.layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, meta.kv_heads, 0, meta.head_dim), np.float32)
    full = sess.run(["logits"], feed)[0]
    assert full.shape == (1, T, meta.vocab)
    for keep in (1, 3, T):
        part = sess.run(["logits"], {**feed, "logits_to_keep": np.array(keep, np.int64)})[0]
        assert part.shape == (1, keep, meta.vocab) and np.allclose(part, full[:, -keep:], atol=1e-5)
    assert np.allclose(runtime.logits(feed["input_ids"][0].tolist()), full[0], atol=1e-5)  # all of them


def test_adapters_switch_per_call_without_reloading(runtime):
    session = runtime.session
    out = {name: runtime.generate(PROMPTS[0], chat=True, adapter=name, max_new_tokens=12).tokens
           for name in (None, "a", "b", None, "a")}
    assert runtime.session is session and len(runtime._adapters) == 2
    assert len({tuple(v) for v in out.values()}) == 3  # each adapter its own output; the base in between
    assert runtime.adapter_names == ["a", "b"]


def test_sampling_is_reproducible_with_a_seed(runtime):
    def sample(seed, **kw):
        return runtime.generate(PROMPTS[1], chat=True, max_new_tokens=12, temperature=1.5, seed=seed, **kw).tokens

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(4)}) > 1
    greedy = runtime.generate(PROMPTS[1], chat=True, max_new_tokens=12).tokens
    assert sample(3, top_k=1) == greedy and sample(5, top_p=1e-6) == greedy


def test_stream_yields_the_same_text_and_stop_strings_cut_it(runtime):
    full = runtime.generate(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a")
    stream = runtime.stream(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a")
    assert "".join(stream) == full.text and stream.result.tokens == full.tokens
    assert len(full.text) > 6, full.text
    stop = full.text[4:6]
    cut = runtime.generate(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a", stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    stream = runtime.stream(PROMPTS[0], chat=True, max_new_tokens=20, adapter="a", stop=[stop])
    assert "".join(stream) == cut.text


def test_runtime_errors(exported, runtime, tmp_path, tiny_runs):
    from qlora_rt.runtime import Model

    with pytest.raises(QloraError, match="has no model.onnx"):
        Model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    meta = json.loads((bad / "qlora_rt_export.json").read_text())
    (bad / "qlora_rt_export.json").write_text(json.dumps({**meta, "layers": 3}))
    with pytest.raises(QloraError, match="does not match qlora_rt_export.json"):
        Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "lora_inputs"}))
    with pytest.raises(QloraError, match="missing lora_inputs"):
        Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "kv_cache"}))
    with pytest.raises(QloraError, match="exported by an older qlora-rt .*export it again"):
        Model(bad)  # its graph concatenates the cache: the in-place binding would read stale rows
    for change, message in [({"layers": "2"}, 'layers is "2"; expected int'),
                            ({"eos_token_ids": [2, None]}, "eos_token_ids is .*expected list"),
                            ({"lora_inputs": []}, "lora_inputs is .*expected dict"),
                            ({"family": "vision"}, "family 'vision' is not one this runtime knows"),
                            ({"task": "classify"}, "task 'classify' is not a decoder task"),
                            ({"mode": "fused"}, "mode 'fused'; expected merged or adapter-aware"),
                            ({"format": "onnx"}, "is not a qlora-rt export description")]:
        (bad / "qlora_rt_export.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(QloraError, match=message):
            Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 16}))
    with pytest.raises(QloraError, match="made for another base model"):  # same shapes, another base
        Model(bad).generate("hello", adapter="a")
    with pytest.raises(QloraError, match="no adapter named 'c'.*available: a, b"):
        runtime.generate("hello", adapter="c")
    with pytest.raises(QloraError, match="--prompt is empty"):
        runtime.generate("  ")
    with pytest.raises(QloraError, match="context is 256 tokens"):
        runtime.generate("hello " * 300)
    with pytest.raises(QloraError, match="--temperature must be >= 0"):
        runtime.generate("hello", temperature=-1)


def test_adapter_of_another_model_is_refused(tmp_path, tiny_runs, exported):
    """An adapter file exported for a model with other dimensions: the shapes do not fit."""
    from qlora_rt.export.onnx_adapters import write_adapter
    from qlora_rt.runtime import Model

    meta = manifest.read(exported)
    arrays = {"model.layers.0.self_attn.o_proj.lora_A": np.zeros((4, 128), np.float32),
              "model.layers.0.self_attn.o_proj.lora_B": np.zeros((4, 64), np.float32)}
    path = write_adapter(arrays, tmp_path / "other.onnx_adapter", meta)
    with pytest.raises(QloraError, match=r"has shape \[4, 128\], this export expects \[None, 64\]"):
        Model(exported).generate("hello", adapter=str(path))
    arrays = {"model.layers.0.self_attn.o_proj.lora_A": np.zeros((64, 4), np.float32),  # an older qlora-rt's layout
              "model.layers.0.self_attn.o_proj.lora_B": np.zeros((4, 64), np.float32)}
    path = write_adapter(arrays, tmp_path / "older.onnx_adapter", meta)
    with pytest.raises(QloraError, match=r"laid out as adapters written for exports of another qlora-rt.*"
                                         r"`qlora-rt export-adapter`"):
        Model(exported).generate("hello", adapter=str(path))


def test_cli_generate_and_chat(exported, runtime, capsys):
    assert main(["generate", str(exported), "--prompt", PROMPTS[0], "--chat", "--adapter", "b",
                 "--max-new-tokens", "8", "--verbose"]) == 0
    out, err = capsys.readouterr()
    want = runtime.generate(PROMPTS[0], chat=True, adapter="b", max_new_tokens=8)
    assert out == want.text + "\n" and "time to first token" in err and "tokens/s" in err
    assert main(["generate", str(exported), "--adapter", "nope", "--prompt", "x"]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err

    from qlora_rt.runtime.console import chat

    lines = iter(["count to five", "/adapter a", "hello", "/adapter zzz", "/exit"])
    messages = chat(ChatConfig(folder=str(exported), max_new_tokens=6), read=lambda _: next(lines))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == runtime.generate(messages[:3], adapter="a", max_new_tokens=6).text
    assert "no adapter named 'zzz'" in capsys.readouterr().err


def _plain_session_logits(folder: Path, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                          adapter: Path | None, new_tokens: list[np.ndarray]) -> list[np.ndarray]:
    """The reference: a plain InferenceSession fed by hand (empty past, then each step's presents), the
    adapter activated with RunOptions. Returns the prompt's logits and each following step's."""
    import onnxruntime as ort

    meta = json.loads((folder / "qlora_rt_export.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    b = ids.shape[0]
    past = {f"past_key_values.{i}.{kv}": np.zeros((b, meta["kv_heads"], 0, meta["head_dim"]), np.float32)
            for i in range(meta["layers"]) for kv in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    out = []
    for step in range(len(new_tokens) + 1):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        results = dict(zip(names, session.run(None, feeds, options)))
        out.append(results["logits"])
        if step == len(new_tokens):
            return out
        past = {k.replace("present", "past_key_values"): v for k, v in results.items() if k.startswith("present")}
        ids, positions = new_tokens[step][:, None], positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)


@pytest.mark.parametrize("lengths", [[1], [2], [3], [4], [1, 1], [1, 3], [4, 2]])
@pytest.mark.parametrize("export_kind,adapter", [("merged", None), ("aware", None), ("aware", "a")])
def test_runtime_equals_a_plain_session(exported, merged_export, export_kind, adapter, lengths):
    """Any prompt length (one token too), any batch shape, every export mode: the decode core's logits for
    each row's prompt and for the steps the rows then take together (each its own cache length: row_lengths)
    are a plain onnxruntime session's for the row alone; and the graph still takes a left-padded batch, as
    Optimum and transformers.js feed it, with the same logits."""
    from qlora_rt.runtime import Model
    from qlora_rt.runtime.decode import Rows

    folder = merged_export if export_kind == "merged" else exported
    model = Model(folder)
    model.generate_ids([[5, 6, 7]], adapter=adapter, max_new_tokens=3)  # a previous call leaves its buffers behind
    prompts = [[(11 * i + 3 * j) % 300 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    params = model.load_adapter(adapter) if adapter else {}
    rows = Rows(model.session, model.input_names, model.meta, len(prompts), max(lengths) + 2)
    got = [np.stack([rows.run(i, np.array([p]), np.array([len(p)]), params)[0] for i, p in enumerate(prompts)])]
    new = [np.array([17 + k] * len(prompts), np.int64) for k in range(2)]
    sizes = np.array(lengths, np.int64)
    for tokens in new:
        sizes += 1
        got.append(rows.run(0, tokens[:, None], sizes, params).copy())
    path = folder / "adapters" / f"{adapter}.onnx_adapter" if adapter else None
    for i, p in enumerate(prompts):
        n = len(p)
        want = _plain_session_logits(folder, np.array([p]), np.ones((1, n), np.int64), np.arange(n)[None], path,
                                     [t[i:i + 1] for t in new])
        for step, (g, w) in enumerate(zip(got, want)):
            assert np.abs(g[i] - w[0, -1]).max() <= 1e-5, (i, step)
        if i == 0:
            assert np.abs(model.logits(p, adapter) - want[0][0]).max() <= 1e-5
    width = max(lengths)
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    padded = _plain_session_logits(folder, ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0), path, new)
    for g, w in zip(got, padded):
        assert np.abs(g - w[:, -1]).max() <= 1e-5


def test_chat_keeps_the_new_message_whole_and_drops_oldest_exchanges(runtime):
    from qlora_rt.runtime.console import fit_history

    long_turn = {"role": "user", "content": "the quick brown fox " * 7}  # ~100 tokens of a 256 context
    convo = fit_history(runtime, "be brief", [], long_turn, room=128)
    assert convo == [{"role": "system", "content": "be brief"}, long_turn]  # the message itself, never cut
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"count to {i}"}, {"role": "assistant", "content": "one two"}]
    convo = fit_history(runtime, "be brief", history, long_turn, room=64)
    assert convo[0]["role"] == "system" and convo[1]["role"] == "user" and convo[-1] == long_turn
    kept = convo[1:-1]
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]  # the latest exchanges, whole
    assert len(runtime.encode(convo)) + 64 <= runtime.meta.max_context
    assert fit_history(runtime, None, history, long_turn, room=1000)[0] == long_turn  # room for none: alone


def test_chat_refuses_a_message_that_cannot_fit_and_keeps_the_session(exported, runtime, capsys):
    from qlora_rt.runtime.console import chat

    lines = iter(["hello", "hello " * 300, "count to five", "/exit"])
    messages = chat(ChatConfig(folder=str(exported), max_new_tokens=4, system="be brief"), read=lambda _: next(lines))
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "count to five"]
    err = capsys.readouterr().err
    assert "this export's context is 256 tokens: shorten it (the conversation so far is kept)" in err
    convo = [{"role": "system", "content": "be brief"}] + messages[:3]
    assert messages[3]["content"] == runtime.generate(convo, max_new_tokens=4).text


def _tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from tests.conftest import make_tokenizer

    text = ["héllo wörld ☃ 你好 世界 naïve café", "the quick brown fox, jumps over: the lazy dog!", "a , b . c"] * 5
    byte_level = make_tokenizer().backend_tokenizer
    byte_level.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, initial_alphabet=
                                                             pre_tokenizers.ByteLevel.alphabet()))
    metaspace = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))  # Llama 2 / SentencePiece style
    metaspace.normalizer = normalizers.Replace(" ", "▁")
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    metaspace.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
    metaspace.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]))
    return {"byte-level": byte_level, "metaspace": metaspace}


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])  # the decoders' tokenizers (GPT-2's, Llama 2's)
def test_text_decoded_token_by_token_is_the_whole_decode(kind):
    """The incremental text of a completion (`runtime.decoder.Text`, the streaming and serving path) equals
    decoding all its tokens at once after every token, characters split across tokens included, and a stop
    string is cut where it first appears."""
    from qlora_rt.runtime.text import Text

    tok = _tokenizers()[kind]
    rng = np.random.default_rng(0)
    sentences = ["héllo wörld ☃ 你好 世界 naïve café", "the quick brown fox, jumps over: the lazy dog!"]
    sequences = [tok.encode(s).ids for s in sentences]
    sequences += [rng.integers(0, tok.get_vocab_size(), 40).tolist() for _ in range(20)]  # any tokens at all
    for ids in sequences:
        text = Text(tok)
        for i, t in enumerate(ids):
            assert not text.add(t)
            whole = tok.decode(ids[: i + 1])
            assert text.text == whole, (kind, ids[: i + 1])
            assert whole.startswith(text.done)
        full = tok.decode(ids)
        if len(full) > 8:
            stop = full[5:8]
            cut = Text(tok, (stop, "never there"))
            first = next(i for i, t in enumerate(ids) if cut.add(t))  # callers stop adding there
            assert cut.text == full[: full.index(stop)]
            assert stop not in tok.decode(ids[:first]) and stop in tok.decode(ids[: first + 1])


def test_penalties_count_the_generated_tokens_and_bias_adds():
    from qlora_rt.runtime.sampling import Sampling

    z = np.zeros(6, np.float32)
    out = Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: 3.0}).adjust(z, [1, 1, 2])
    np.testing.assert_allclose(out, [0, -1.0, -0.75, 0, 0, 3.0])
    assert not z.any(), "the row itself is left as it was"
    assert Sampling().adjust(z, [1]) is z
    with pytest.raises(QloraError, match="frequency_penalty must be in"):
        Sampling(frequency_penalty=float("nan")).check()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the process's RSS from /proc")
def test_the_kv_cache_takes_memory_as_its_rows_are_written_not_at_capacity():
    """A server's cache is sized for --max-batch rows x --max-seq-len positions; what a row holds resident must
    follow the positions it has written. 8 rows x 4,096 positions here is 256 MiB at capacity; one position
    written in every row and head is 1 MiB in 4 KiB pages (in 2 MiB huge pages, numpy's choice for arrays this
    large, it would be all 256 MiB), so the bound of 32 MiB leaves room for anything else the process does."""
    from qlora_rt.runtime.kv_cache import KVCache

    def rss_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    meta = manifest.Manifest(format=manifest.FORMAT, mode="merged", layers=4, base_fingerprint="-", base_quant="-",
                             lora_inputs={}, kv_heads=4, head_dim=64)
    before = rss_mib()
    kv = KVCache(meta, rows=8, capacity=4096)
    assert kv.nbytes == 256 << 20
    for buffer in kv.buffers.values():
        buffer[:, :, 0] = 1.0  # what GroupQueryAttention does to each row and head for a one-token prompt
    assert rss_mib() - before < 32
    assert all(float(b[:, :, 1:].max()) == 0.0 for b in kv.buffers.values())  # zeroed, as np.zeros was
