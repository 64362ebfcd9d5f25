import json
import shutil

import pytest

from qlora_rt.errors import QloraError
from qlora_rt.load import load


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

    from qlora_rt.load import _gguf_architecture

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])  # a string array before it must be skipped
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    assert _gguf_architecture(tmp_path / "m.gguf") == "gpt2"
    with pytest.raises(QloraError, match="architecture 'gpt2' is not supported yet"):
        load(tmp_path / "m.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(QloraError, match="truncated header"):
        load(tmp_path / "t.gguf")
