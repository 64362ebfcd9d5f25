"""Adapters move between qlora-rt and PEFT in both directions, on the same quantized base."""

import json
import shutil

import pytest
import torch

from qlora_rt.base import formats
from qlora_rt.base.load import load
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import LoraConfig, add_adapters, lora_layers, quantize_model
from qlora_rt.lora.peft_io import save_adapter
from qlora_rt.trained import open_trained

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def ours_with_random_adapter(path, cfg=LoraConfig(rank=4, alpha=8, dropout=0.0, targets="all-linear"), fmt="nf4"):
    loaded = load(path)
    quantize_model(loaded.model, formats.QuantConfig(fmt), torch.device("cpu"))
    add_adapters(loaded.model, cfg)
    torch.manual_seed(1)
    for layer in lora_layers(loaded.model).values():
        if layer.rank:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    return loaded


def peft_model(path, adapter=None, **lora):
    """transformers + bitsandbytes NF4 double-quant base, with PEFT on top: the reference stack."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    fp32_reference(base)
    if adapter:
        return PeftModel.from_pretrained(base, adapter).eval()
    return get_peft_model(base, PeftConfig(task_type="CAUSAL_LM", **lora)).eval()


def fp32_reference(model) -> None:
    """Keep bitsandbytes' Linear4bit in fp32 at inference.

    On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight and runs a bf16 kernel in eval
    mode (~1e-2 off x @ dequantize(W).T); elsewhere it dequantizes to fp32. The reference must not depend
    on which CPU runs the tests.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def test_our_adapter_loads_in_peft(tiny_llama, tmp_path):
    ours = ours_with_random_adapter(tiny_llama)
    save_adapter(ours.model, tmp_path / "a", LoraConfig(rank=4, alpha=8, dropout=0.0), formats.QuantConfig(),
                 str(tiny_llama), ours.fingerprint)
    diff = (logits(ours.model.eval()) - logits(peft_model(tiny_llama, tmp_path / "a"))).abs().max().item()
    assert diff <= 1e-4


def test_peft_adapter_loads_here(tiny_llama, tmp_path):
    peft = peft_model(tiny_llama, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    peft.save_pretrained(tmp_path / "p")
    loaded, cfg, info = open_trained(tiny_llama, tmp_path / "p")
    assert cfg.format == "nf4" and cfg.double_quant and len(info.modules) == 6
    diff = (logits(loaded.model.eval()) - logits(peft)).abs().max().item()
    assert diff <= 1e-4


def test_roundtrip_keeps_rank_alpha_and_rslora(tiny_llama, tmp_path):
    cfg = LoraConfig(rank=3, alpha=5, dropout=0.0, rslora=True, targets="attention")
    ours = ours_with_random_adapter(tiny_llama, cfg, fmt="fp4")
    save_adapter(ours.model, tmp_path / "a", cfg, formats.QuantConfig("fp4"), str(tiny_llama), ours.fingerprint)
    loaded, qcfg, _ = open_trained(tiny_llama, tmp_path / "a")
    assert qcfg.format == "fp4"
    assert torch.equal(logits(loaded.model.eval()), logits(ours.model.eval()))


@pytest.fixture
def saved_adapter(tiny_llama, tmp_path):
    ours = ours_with_random_adapter(tiny_llama)
    return save_adapter(ours.model, tmp_path / "a", LoraConfig(rank=4), formats.QuantConfig(), str(tiny_llama),
                        ours.fingerprint)


def test_adapter_with_wrong_shapes_or_targets(saved_adapter, tmp_path):
    from conftest import save_checkpoint

    wider = save_checkpoint(tmp_path / "wider", hidden_size=96, seed=0)
    with pytest.raises(QloraError, match=r"has A \(4, \d+\), B \(\d+, 4\); the base layer needs .*96"):
        open_trained(wider, saved_adapter)
    deeper = save_checkpoint(tmp_path / "deeper", num_hidden_layers=1)
    with pytest.raises(QloraError, match="targets model.layers.1.*not a Linear of this base"):
        open_trained(deeper, saved_adapter)


def test_adapter_for_another_base_with_same_shapes(saved_adapter, tmp_path):
    from conftest import save_checkpoint

    other = save_checkpoint(tmp_path / "other", seed=7)
    with pytest.raises(QloraError, match="trained on a different base model"):
        open_trained(other, saved_adapter)


def test_bad_adapter_folders(tiny_llama, saved_adapter, tmp_path):
    with pytest.raises(QloraError, match="missing does not exist"):
        open_trained(tiny_llama, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QloraError, match="has no adapter_config.json"):
        open_trained(tiny_llama, tmp_path / "empty")
    run = tmp_path / "run"
    shutil.copytree(saved_adapter, run / "adapter")
    with pytest.raises(QloraError, match=f"is a training run's folder; its adapter is {run / 'adapter'}"):
        open_trained(tiny_llama, run)
    with pytest.raises(QloraError, match="is a file; expected an adapter folder"):
        open_trained(tiny_llama, saved_adapter / "adapter_config.json")
    mismatched = shutil.copytree(saved_adapter, tmp_path / "mismatched")
    cfg = json.loads((mismatched / "adapter_config.json").read_text())
    (mismatched / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(QloraError, match="r=8 for .* have rank 4: the two files do not belong together"):
        open_trained(tiny_llama, mismatched)
    broken = shutil.copytree(saved_adapter, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(QloraError, match="corrupt or unreadable safetensors"):
        open_trained(tiny_llama, broken)
    dora = shutil.copytree(saved_adapter, tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(QloraError, match="use_dora=True is not supported"):
        open_trained(tiny_llama, dora)
    with pytest.raises(QloraError, match="trained on a nf4 base"):
        open_trained(tiny_llama, saved_adapter, quant_format="fp4")


def test_adapter_loaded_for_inference_has_no_active_dropout(tiny_llama, tmp_path):
    cfg = LoraConfig(rank=4, alpha=8, dropout=0.5)
    ours = ours_with_random_adapter(tiny_llama, cfg)
    save_adapter(ours.model, tmp_path / "a", cfg, formats.QuantConfig(), str(tiny_llama), ours.fingerprint)
    loaded, _, _ = open_trained(tiny_llama, tmp_path / "a")
    assert torch.equal(logits(loaded.model), logits(loaded.model))
