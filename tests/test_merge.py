import pytest
import torch
from test_adapters import logits, ours_with_random_adapter

from qlora_rt.base import formats
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import LoraConfig, lora_layers
from qlora_rt.lora.peft_io import save_adapter
from qlora_rt.merge import merge, merge_weight, merged_state_dict


@pytest.mark.parametrize("tie", [False, True])
def test_merged_checkpoint_equals_unmerged_lora_model(tmp_path, tie):
    from conftest import save_checkpoint
    from transformers import AutoModelForCausalLM

    base = save_checkpoint(tmp_path / "base", tie=tie)
    ours = ours_with_random_adapter(base)
    save_adapter(ours.model, tmp_path / "a", LoraConfig(rank=4, alpha=8), formats.QuantConfig(), str(base),
                 ours.fingerprint)
    before = {n: p.clone() for n, p in ours.model.named_parameters()}
    merged_state_dict(ours.model)
    assert all(torch.equal(before[n], p) for n, p in ours.model.named_parameters())  # pure: no mutation

    merge(str(base), str(tmp_path / "a"), str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    diff = (logits(plain) - logits(ours.model.eval())).abs().max().item()
    assert diff <= 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_merge_refuses_nan_and_existing_output(tmp_path, tiny_llama):
    a, b = torch.randn(2, 8), torch.randn(4, 2)
    b[0, 0] = float("nan")
    with pytest.raises(QloraError, match="layer.x: merged weight has NaN"):
        merge_weight(torch.zeros(4, 8), a, b, 1.0, "layer.x")
    (tmp_path / "out").mkdir()
    with pytest.raises(QloraError, match="already exists"):
        merge(str(tiny_llama), str(tmp_path / "a"), str(tmp_path / "out"))


def test_nan_adapter_leaves_previous_merge_intact(tmp_path, tiny_llama):
    ours = ours_with_random_adapter(tiny_llama)
    good = tmp_path / "good"
    save_adapter(ours.model, good, LoraConfig(rank=4), formats.QuantConfig(), str(tiny_llama), ours.fingerprint)
    merge(str(tiny_llama), str(good), str(tmp_path / "merged"))
    first = (tmp_path / "merged" / "model.safetensors").read_bytes()
    next(iter(l for l in lora_layers(ours.model).values() if l.rank)).lora_B.weight.data[0, 0] = float("inf")
    save_adapter(ours.model, tmp_path / "bad", LoraConfig(rank=4), formats.QuantConfig(), str(tiny_llama),
                 ours.fingerprint)
    with pytest.raises(QloraError, match="NaN/inf"):
        merge(str(tiny_llama), str(tmp_path / "bad"), str(tmp_path / "merged"), overwrite=True)
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == first


def test_merge_overwrite_replaces_only_a_merge(tmp_path, tiny_llama, capsys):
    from qlora_rt.cli import main

    ours = ours_with_random_adapter(tiny_llama)
    save_adapter(ours.model, tmp_path / "a", LoraConfig(rank=4, alpha=8), formats.QuantConfig(), str(tiny_llama),
                 ours.fingerprint)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "thesis.tex").write_text("years of work")
    argv = ["merge", "--model", str(tiny_llama), "--adapter", str(tmp_path / "a"), "--overwrite", "--out"]
    assert main(argv + [str(tmp_path / "keep")]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["thesis.tex"]
    assert main(argv + [str(tmp_path / "merged")]) == 0
    assert main(argv + [str(tmp_path / "merged")]) == 0  # a merge replaces a merge
    assert (tmp_path / "merged" / "qlora_rt_merge.json").exists()


def test_merge_is_written_one_shard_at_a_time_and_loads_in_transformers(tmp_path, tiny_llama):
    import json
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora_rt.merge import merged_weights, write_shards

    ours = ours_with_random_adapter(tiny_llama)
    calls = []
    weights = {k: (shape, lambda make=make, k=k: calls.append(k) or make()) for k, (shape, make) in
               merged_weights(ours.model).items()}
    out = tmp_path / "m"
    out.mkdir()
    write_shards(weights, out, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and sorted(calls) == sorted(weights)  # each computed once
    whole = merged_state_dict(ours.model)
    read = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(str(out / f)).items()}
    assert read.keys() == whole.keys() and all(torch.equal(read[k], whole[k]) for k in whole)
    shutil.copy(tiny_llama / "config.json", out)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(plain) - logits(ours.model.eval())).abs().max().item() <= 1e-4


def test_an_adapter_changed_on_disk_is_refused_by_merge_and_export(tmp_path):
    """The adapter qlora-rt writes records its tensors' digest (safetensors metadata, which PEFT ignores): bytes
    changed in the file since (a bad disk, a partial copy; here the lowest byte of a few fp32 values, which no
    reader notices) make merge and export refuse it, naming the file. A PEFT adapter carries none: accepted."""
    from conftest import save_checkpoint
    from safetensors import safe_open

    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.lora.peft_io import DIGEST

    base = save_checkpoint(tmp_path / "base")
    ours = ours_with_random_adapter(base)
    save_adapter(ours.model, tmp_path / "a", LoraConfig(rank=4, alpha=8), formats.QuantConfig(), str(base),
                 ours.fingerprint)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as h:
        assert len(h.metadata()[DIGEST]) == 64
    data = bytearray(weights.read_bytes())
    for k in range(len(data) - 400, len(data) - 200, 4):  # inside the last tensors' data, little-endian low bytes
        data[k] ^= 1
    weights.write_bytes(bytes(data))
    for run in (lambda: merge(str(base), str(tmp_path / "a"), str(tmp_path / "merged")),
                lambda: export(ExportConfig(model=str(base), adapter=str(tmp_path / "a"), out=str(tmp_path / "x")))):
        with pytest.raises(QloraError, match=r"adapter_model\.safetensors: its tensors changed on disk since they "
                                             r"were written"):
            run()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "x").exists()
