"""PiSSA and LoftQ: the split is closer to W than plain quantization, and the residual base travels with
the adapter through training, resume, merge and export."""

import json
import shutil

import pytest
import torch
from conftest import make_model
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_rt.base import formats
from qlora_rt.base.linears import linear_names
from qlora_rt.config import ExportConfig, TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import LoraConfig, add_adapters, lora_layers, quantize_model
from qlora_rt.lora.svd_init import RESIDUAL, InitConfig, Plan, low_rank, relative_error, split
from qlora_rt.train.run import train
from qlora_rt.trained import open_trained

CPU = torch.device("cpu")
FORMATS = [formats.QuantConfig("nf4"), formats.QuantConfig("nf4", double_quant=False), formats.QuantConfig("fp4"),
           formats.QuantConfig("int4"), formats.QuantConfig("int4", symmetric=True),
           formats.QuantConfig("int4", block_size=64)]


def weight(out=96, inp=64, seed=0) -> torch.Tensor:
    """A weight with a decaying spectrum plus noise, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g)
    return 0.02 * (low + 0.5 * torch.randn(out, inp, generator=g))


def test_low_rank_factors_are_the_best_rank_r_product():
    W = weight()
    L, R = low_rank(W, 8, "exact")
    U, S, Vh = torch.linalg.svd(W)
    assert L.shape == (96, 8) and R.shape == (8, 64)
    assert torch.allclose(L @ R, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-6)
    Lr, Rr = low_rank(W, 8, "lowrank")  # randomized: same product on a decaying spectrum, to float noise
    assert torch.linalg.norm(Lr @ Rr - L @ R) / torch.linalg.norm(L @ R) < 0.05
    assert low_rank(W[:4], 8, "exact")[0].shape == (4, 4)  # rank capped by the smaller side


@pytest.mark.parametrize("qcfg", FORMATS,
                         ids=lambda q: f"{q.format}-b{q.block_size}-dq{q.double_quant}-sym{q.symmetric}")
def test_split_approximates_w_better_than_plain_quantization(qcfg):
    W, r, s = weight(), 8, 2.0
    plain = relative_error(W, formats.quantize(W, qcfg, CPU))
    errors = {}
    for cfg in (InitConfig("pissa"), InitConfig("loftq", 1), InitConfig("loftq", 5)):
        base, A, B = split(W, qcfg, r, s, cfg, CPU)
        assert A.shape == (r, 64) and B.shape == (96, r) and formats.is_quantized(base)
        errors[cfg.describe()] = relative_error(W, base, A, B, s)
    print(f"plain {plain:.4f}", errors)
    assert errors["loftq(1)"] < plain and errors["loftq(5)"] < plain
    assert errors["loftq(5)"] <= errors["loftq(1)"] * 1.02
    assert errors["pissa"] <= plain  # W is reproduced within (here: below) the quantization error


def test_pissa_adapter_holds_the_principal_part_scaled():
    W = weight()
    for s in (0.5, 2.0, 16.0):  # scale accounted for: s·B·A is the top-r product whatever alpha/r is
        base, A, B = split(W, formats.QuantConfig("none"), 8, s, InitConfig("pissa"), CPU)
        L, R = low_rank(W, 8, "exact")
        assert torch.allclose(s * B @ A, L @ R, atol=1e-6)
        assert torch.allclose(formats.dequantize(base) + s * B @ A, W, atol=1e-6)  # no quantization: exact
        assert torch.allclose(A.norm(), B.norm(), rtol=1e-4)  # balanced split


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["pissa", "loftq"])
def test_initial_logits_are_closer_to_full_precision_than_plain_qlora(method):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    full = _logits(make_model(seed=3).eval(), ids)
    qcfg, lcfg = formats.QuantConfig("nf4"), LoraConfig(rank=16, alpha=16, dropout=0.0)
    plain = make_model(seed=3).eval()
    quantize_model(plain, qcfg, CPU)
    add_adapters(plain, lcfg)
    model = make_model(seed=3).eval()
    plan = Plan(InitConfig(method, 3), qcfg, 16, lcfg.scale(), set(linear_names(model)), CPU)
    quantize_model(model, qcfg, CPU, split=plan)
    add_adapters(model, lcfg)
    plan.apply(model)
    d_plain, d_init = (_logits(plain, ids) - full).abs().mean().item(), (_logits(model, ids) - full).abs().mean().item()
    assert d_init < 0.8 * d_plain, (d_init, d_plain)
    assert all(after < before for before, after in plan.errors.values())  # strictly lower on every layer


def cfg(tiny_llama, tiny_data, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), out=str(out), rank=4, alpha=8, steps=6,
                batch_size=2, seq_len=64, lr=5e-3, eval_every=0, checkpoint_every=3, seed=0, init="loftq",
                loftq_iters=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def loftq_run(tiny_llama, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("loftq") / "run"
    train(cfg(tiny_llama, tiny_data, out))
    return out


def test_run_saves_its_residual_base_and_merge_and_export_use_it(tiny_llama, loftq_run, tmp_path):
    from qlora_rt.export.exporter import export
    from qlora_rt.merge import merged_state_dict

    adapter = loftq_run / "adapter"
    assert (loftq_run / RESIDUAL).is_file() and (adapter / RESIDUAL).is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == "loftq"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as h:
        assert h.metadata()["init"] == "loftq(2)" and h.metadata()["base.residual"]
    loaded, _, _ = open_trained(tiny_llama, adapter)
    plain, _, _ = open_trained(tiny_llama)
    q = "model.layers.0.self_attn.q_proj"
    residual = formats.dequantize(lora_layers(loaded.model)[q].weight)
    assert not torch.equal(residual, formats.dequantize(lora_layers(plain.model)[q].weight))  # its own base is used
    merged = merged_state_dict(loaded.model)[f"{q}.weight"]
    layer = lora_layers(loaded.model)[q]
    assert torch.allclose(merged, residual + layer.scale * layer.lora_B.weight @ layer.lora_A.weight, atol=1e-6)
    report = export(ExportConfig(model=str(tiny_llama), adapter=str(adapter), out=str(tmp_path / "onnx"),
                                 int4_compute="fp32"))
    assert report["max_abs_logit_diff"] <= 1e-3 and report["greedy_identical_prompts"] == report["prompts"]


def test_resumed_pissa_run_keeps_its_residual_and_ends_the_same(tiny_llama, tiny_data, tmp_path):
    train(cfg(tiny_llama, tiny_data, tmp_path / "full", init="pissa"))

    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_llama, tiny_data, tmp_path / "cut", init="pissa"), on_step=interrupt)
    train(cfg(tiny_llama, tiny_data, tmp_path / "cut", init="pissa", resume=True))
    from safetensors.torch import load_file

    full, cut = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("full", "cut"))
    assert max((full[k] - cut[k]).abs().max().item() for k in full) <= 1e-6


def test_missing_altered_or_foreign_residual_is_an_error(tiny_llama, loftq_run, tiny_runs, tmp_path):
    from qlora_rt.export.exporter import export
    from qlora_rt.export.onnx_adapters import export_adapter

    broken = tmp_path / "no-residual"
    shutil.copytree(loftq_run / "adapter", broken)
    (broken / RESIDUAL).unlink()
    with pytest.raises(QloraError, match="residual_base.safetensors is missing.*copy the whole folder"):
        open_trained(tiny_llama, broken)
    altered = tmp_path / "altered"
    shutil.copytree(loftq_run / "adapter", altered)
    with safe_open(str(altered / RESIDUAL), "pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    key = next(k for k in tensors if k.endswith(".weight"))
    tensors[key][0] ^= 1  # one 4-bit code changed
    save_file(tensors, str(altered / RESIDUAL), metadata=meta)
    with pytest.raises(QloraError, match="residual base does not match its adapter"):
        open_trained(tiny_llama, altered)
    peft_pissa = tmp_path / "peft-pissa"  # PEFT's PiSSA without its residual: refused, not silently wrong
    shutil.copytree(tiny_runs[1]["a"], peft_pissa)
    config = json.loads((peft_pissa / "adapter_config.json").read_text())
    (peft_pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(QloraError, match="init_lora_weights='pissa_niter_4'.*own residual base"):
        open_trained(tiny_llama, peft_pissa)
    # the export of a LoftQ run takes no plain adapter, and a plain export takes no LoftQ adapter
    export(ExportConfig(model=str(tiny_llama), adapter=str(loftq_run / "adapter"), out=str(tmp_path / "x")))
    with pytest.raises(QloraError, match="residual base; an adapter trained on the plain base does not fit"):
        export_adapter(str(tiny_runs[1]["a"]), str(tmp_path / "x"), "plain")
    export(ExportConfig(model=str(tiny_llama), out=str(tmp_path / "bare")))
    with pytest.raises(QloraError, match="initialised with loftq.2. and belongs to its own residual base"):
        export_adapter(str(loftq_run / "adapter"), str(tmp_path / "bare"), "loftq")


def test_bad_init_settings():
    for kw, msg in (({"method": "olora"}, "--init: expected one of"), ({"method": "loftq", "loftq_iters": 0},
                    "--loftq-iters: expected 1..5"), ({"svd": "fast"}, "--svd: expected one of")):
        with pytest.raises(QloraError, match=msg):
            InitConfig(**kw)


def test_bad_init_fails_before_loading_the_model(tiny_data, tmp_path):
    with pytest.raises(QloraError, match="--loftq-iters must be at least 1 and at most 5, got 9"):
        train(TrainConfig(model=str(tmp_path / "no-such-model"), data=str(tiny_data / "train.jsonl"),
                          out=str(tmp_path / "run"), init="loftq", loftq_iters=9))
