"""Tiny random models, saved as real Hugging Face checkpoint folders, and small JSONL files.

The tokenizer is a byte-level BPE trained here on a few sentences, with a ChatML template, so the
tests go through the same loading, chat-template and offset paths as a real model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
          "rewrite the date 5 march 2021 as 2021-03-05", "hello world, how are you today?",
          "one two three four five six seven eight nine ten"] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_model(model_type: str = "llama", vocab: int = 320, seed: int = 0, tie: bool = False, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tie, head_dim=16)
    kw.update(over)
    config = AutoConfig.for_model(model_type, **kw)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_checkpoint(folder: Path, **kw) -> Path:
    model = make_model(**kw)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small mixed-format training file and an eval file."""
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(24):
        rows.append({"messages": [{"role": "user", "content": f"count to {i % 5 + 2}"},
                                  {"role": "assistant", "content": " ".join(["one", "two", "three", "four",
                                                                             "five", "six"][: i % 5 + 2])}]})
        rows.append({"prompt": "the capital of france? ", "completion": "paris."})
        rows.append({"text": CORPUS[i % 5]})
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "eval.jsonl", rows[:9])
    return d


@pytest.fixture(scope="session")
def tiny_runs(tiny_llama, tiny_data, tmp_path_factory):
    """Two short training runs on tiny_llama, on an NF4 base (bitsandbytes, as PEFT trains): adapter a (r=4,
    all-linear) and b (r=8, q/v only)."""
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, rank, targets, seed in (("a", 4, "all-linear", 0), ("b", 8, "q_proj,v_proj", 1)):
        out[name] = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), out=str(tmp / name),
                                      quant="nf4", steps=6, rank=rank, targets=targets, seed=seed, lr=1e-2,
                                      batch_size=2,
                                      seq_len=64, checkpoint_every=0, eval_every=0)).adapter
    return tmp, out


@pytest.fixture(scope="session")
def tiny_export(tiny_llama, tiny_runs):
    """A bare NF4 base's adapter-aware fp32 export (LoRA inputs on every Linear) with adapters a and b added."""
    from qlora_rt.cli import main
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    tmp, adapters = tiny_runs
    out = tmp / "export-ab"
    export(ExportConfig(model=str(tiny_llama), out=str(out), quant="nf4", weights="fp32"))
    for name in ("a", "b"):
        assert main(["export-adapter", "--adapter", str(adapters[name]), "--onnx", str(out), "--name", name]) == 0
    return out


# ---- encoders -----------------------------------------------------------------------------------------
WORDS = {"positive": ["good", "great", "lovely", "excellent", "fine"],
         "negative": ["bad", "awful", "terrible", "poor", "horrible"],
         "neutral": ["okay", "average", "plain", "usual", "so-so"]}
FILLER = ["the", "movie", "was", "really", "quite", "food", "service", "day", "and", "a"]


def make_encoder_tokenizer():
    """A WordPiece tokenizer with BERT's special tokens and [CLS] A [SEP] (B [SEP]) template, token types."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # the vocabulary written out, not trained: tokenizers' WordPieceTrainer breaks ties in its own hash order, so
    # each process got another vocabulary (230-232 tokens), another base and another training run
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = CORPUS + [" ".join(w) for w in WORDS.values()] + [" ".join(FILLER)]
    words = {w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))}
    chars = sorted({c for w in words for c in w})
    vocab = special + chars + [f"##{c}" for c in chars] + sorted(words - set(chars))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


ENCODER_CONFIGS = {
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, type_vocab_size=2),
    "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=66, type_vocab_size=1),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64),
    # answerdotai/ModernBERT-base's attention: heads of 64, a global layer then two local ones (window 128,
    # here cut to 8 so a test sentence passes it), RoPE 160000 / 10000; GeGLU; no biases
    "modernbert": dict(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                       max_position_embeddings=64, local_attention=8, classifier_pooling="mean",
                       layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}
ENCODER_CONFIGS["xlm-roberta"] = ENCODER_CONFIGS["roberta"]


def save_encoder(folder: Path, model_type: str = "bert", seed: int = 0, **over) -> Path:
    """A random-init base encoder (no head, like all-MiniLM-L6-v2's BertModel) and its tokenizer."""
    from transformers import AutoConfig, AutoModel

    tok = make_encoder_tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  **{**ENCODER_CONFIGS[model_type], **over})
    AutoModel.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0, labels=("negative", "positive"), pairs: bool = False) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        words = rng.sample(FILLER, 2) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": label}
        if pairs:
            row["text_pair"] = " ".join(rng.sample(FILLER, 3))
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sentiment")
    write_jsonl(d / "train.jsonl", sentiment_rows(32, 0))
    write_jsonl(d / "eval.jsonl", sentiment_rows(24, 1))
    return d


@pytest.fixture(scope="session")
def bert_run(tiny_bert, sentiment, tmp_path_factory) -> Path:
    """A short classification run on tiny_bert (nf4): its adapter folder."""
    from qlora_rt.config import TrainConfig
    from qlora_rt.train.run import train

    out = tmp_path_factory.mktemp("bert-run") / "run"
    return train(TrainConfig(model=str(tiny_bert), data=str(sentiment / "train.jsonl"), out=str(out), steps=12,
                             eval_data=str(sentiment / "eval.jsonl"), lr=5e-3, batch_size=8, rank=4, seq_len=32,
                             checkpoint_every=0, eval_every=0)).adapter


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder_export(tiny_bert, bert_run, tmp_path_factory) -> Path:
    """An adapter-aware export of tiny_bert with bert_run's adapter (head and labels) as `sentiment`."""
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    out = tmp_path_factory.mktemp("encoder") / "onnx"
    export(ExportConfig(model=str(tiny_bert), adapter=str(bert_run), out=str(out), name="sentiment"))
    return out


@pytest.fixture(scope="session")
def merged_export(tiny_llama, tiny_runs, tmp_path_factory):
    """A merged export of tiny_llama with adapter a folded in."""
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    out = tmp_path_factory.mktemp("merged") / "onnx"
    export(ExportConfig(model=str(tiny_llama), adapter=str(tiny_runs[1]["a"]), out=str(out), mode="merged"))
    return out


def serve_in_thread(app):
    """A real uvicorn server for an app, on a free port, in a thread: (port, stop)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(20)
    return port, stop


def genai_greedy(folder: Path, ids: list[int], new: int, adapter: str | None = None) -> list[int]:
    """onnxruntime-genai's greedy tokens for one prompt on an export folder, its adapter active where named; genai
    ends a row at its end-of-text token and pads it after."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(np.array([ids], np.int32))
    tokens = []
    for _ in range(new):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def served_completion(folder: Path, prompt: str, new: int, model: str = "default") -> str:
    """The text `serve` answers a greedy completion of `new` tokens with (end-of-text ignored), through the app
    in process; the engine is closed after."""
    import asyncio

    import httpx

    from qlora_rt.server.app import create_app

    app = create_app(folder, max_batch=2, max_queue=4, served_model_name="served")

    async def ask() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=300) as c:
            r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": new,
                                                      "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
    try:
        return asyncio.run(ask())
    finally:
        app.state.qlora.engine.close(5)
