import math

import pytest
import torch
from conftest import make_model

from qlora_rt.base import formats
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import LoraConfig, LoRALinear, add_adapters, lora_layers, quantize_model, resolve_targets

CPU = torch.device("cpu")


def quantized(fmt="nf4", **kw):
    return quantize_model(make_model(**kw), formats.QuantConfig(fmt), CPU)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_zero_B_gives_exactly_the_quantized_base(model_type):
    ids = torch.randint(0, 320, (2, 12))
    base = quantized(model_type=model_type)
    with torch.no_grad():
        before = base(ids).logits
    add_adapters(base, LoraConfig(rank=8, targets="all-linear", dropout=0.0))
    with torch.no_grad():
        after = base(ids).logits
    assert torch.equal(before, after)


def test_every_decoder_linear_is_quantized_and_head_is_not():
    model = quantized(tie=False)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    assert all(formats.is_quantized(m.weight) for m in layers.values())
    assert not isinstance(model.lm_head, LoRALinear)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_only_A_and_B_get_gradients():
    model = quantized()
    add_adapters(model, LoraConfig(rank=4))
    ids = torch.randint(0, 320, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B.weight"))


def test_lora_output_is_base_plus_scaled_BA():
    torch.manual_seed(0)
    w = formats.quantize(torch.randn(24, 32), formats.QuantConfig("nf4"), CPU)
    layer = LoRALinear(w, None, 32, 24)
    layer.attach(rank=4, alpha=8, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    expected = x @ formats.dequantize(w).T + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    layer.attach(rank=4, alpha=8, rslora=True)
    assert layer.scale == 8 / math.sqrt(4)


@pytest.mark.parametrize("spec,leaves", [
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("q_proj, v_proj", {"q_proj", "v_proj"}),
])
def test_targets(spec, leaves):
    names = resolve_targets(quantized(), spec)
    assert {n.rsplit(".", 1)[-1] for n in names} == leaves and len(names) == 2 * len(leaves)


def test_unknown_target_names_what_exists():
    with pytest.raises(QloraError, match=r"--targets: qkv_proj not found.*down_proj"):
        resolve_targets(quantized(), "qkv_proj")


def test_disabled_runs_the_base_alone():
    model = quantized().eval()
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        base = model(ids).logits
        add_adapters(model, LoraConfig(rank=4))
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight)
        tuned = model(ids).logits
        from qlora_rt.lora.layers import disabled

        with disabled(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, tuned) and not torch.equal(base, tuned)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "none"])
def test_bf16_products_stay_close_to_fp32_forward_and_backward(fmt):
    """`use_bf16_products` (training on a CPU with bf16 matrix units): the frozen products in bf16, the result
    and every gradient fp32 and within bf16 rounding of the fp32 model's."""
    from qlora_rt.lora.layers import use_bf16_products

    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 12))
    runs = []
    for bf16 in (False, True):
        torch.manual_seed(1)
        model = quantize_model(make_model(), formats.QuantConfig(fmt), CPU)
        add_adapters(model, LoraConfig(rank=8, dropout=0.0))
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        if bf16:  # every quantized Linear (a plain --quant none weight keeps its own dtype)
            assert use_bf16_products(model) == (0 if fmt == "none" else 14)
        logits = model(ids).logits
        assert logits.dtype == torch.float32
        logits.square().mean().backward()
        runs.append((logits.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = runs
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    for x, y in zip(ga, gb):
        assert (x - y).norm() <= 0.05 * x.norm() + 1e-8


def test_cpu_dropout_keeps_the_expectation_and_replays_with_the_generator():
    from qlora_rt.lora.layers import LoraDropout

    drop = LoraDropout(0.25).train()
    x = torch.ones(400, 500)
    torch.manual_seed(3)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01 and abs(y.mean().item() - 1.0) < 0.02
    scale = torch.tensor(65536 / (65536 - round(0.25 * 65536))).item()  # in fp32
    assert set(torch.unique(y).tolist()) == {0.0, scale}
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the default generator's state gives the mask (checkpoint replay, resume)
    x.requires_grad_(True)
    torch.manual_seed(3)
    drop(x).sum().backward()
    assert torch.equal(x.grad, y)  # d(mask * x * scale)/dx
    assert torch.equal(drop.eval()(x), x)
