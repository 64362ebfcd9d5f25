"""The int4 training format: packing, onnxruntime's MatMulNBits on the same bytes, gradients, GGUF Q4 import."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from qlora_rt.base import formats as quant
from qlora_rt.base import gguf_reader
from qlora_rt.base import packed_int4 as int4
from qlora_rt.errors import QloraError
from qlora_rt.export.int4_weights import nbits_inputs


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 3, 32), dtype=torch.uint8)
    packed = int4.pack(codes)
    assert packed.shape == (5, 3, 16) and torch.equal(int4.unpack(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4  # even index: low nibble


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("K,block", [(64, 32), (96, 64), (72, 16)])  # 96/64: a padded last block
def test_rounding_error_is_at_most_half_a_step(symmetric, K, block):
    w = torch.randn(24, K)
    packed, s = int4.quantize(w, block, symmetric)
    assert packed.shape == (24, -(-K // block), block // 2)
    step = s.scales.abs().repeat_interleave(block, 1)[:, :K]
    err = (int4.dequantize(packed, s) - w).abs()
    assert (err <= step / 2 + 1e-6).all() or symmetric and (err <= step + 1e-6).all()


def _matmul_nbits(x: np.ndarray, packed, s: int4.Int4, accuracy: int) -> np.ndarray:
    return _matmul_inputs(x, nbits_inputs(packed, s), s, accuracy)


def _matmul_inputs(x: np.ndarray, inputs: dict, s: int4.Int4, accuracy: int = 0) -> np.ndarray:
    """One MatMulNBits (s: K, bits, block) over its inputs (qweight, scales, zero_points) in onnxruntime."""
    N = inputs["scales"].shape[0]
    names = ["x", "B", "s"] + (["z"] if "zero_points" in inputs else [])
    inits = [numpy_helper.from_array(inputs[k], n) for k, n in (("qweight", "B"), ("scales", "s"), ("zero_points", "z"))
             if k in inputs]
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=s.K, N=N, bits=s.bits,
                            block_size=s.block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, list(x.shape))],
                              [helper.make_tensor_value_info("y", 1, [x.shape[0], N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("compute,accuracy", [("fp32", 0), ("int8", 4)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("N,K,block,M", [(64, 64, 32, 1), (192, 576, 32, 7), (96, 160, 64, 3), (128, 256, 128, 2)])
def test_torch_linear_equals_matmulnbits_on_the_same_bytes(compute, accuracy, symmetric, N, K, block, M):
    torch.manual_seed(0)
    packed, s = int4.quantize(torch.randn(N, K) * 0.05, block, symmetric, compute)
    x = torch.randn(M, K) * 2
    ours = int4.linear(x, packed, s).numpy()
    theirs = _matmul_nbits(x.numpy(), packed, s, accuracy)
    assert np.abs(ours - theirs).max() <= 1e-4
    if compute == "int8":  # and the emulation matters: the fp32 product is far from the kernel's result
        fp32 = (x @ int4.dequantize(packed, s).T).numpy()
        assert np.abs(fp32 - theirs).max() > 100 * np.abs(ours - theirs).max()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_gradients_match_an_fp32_reference_on_the_dequantized_weight(kind):
    from gguf import GGMLQuantizationType, quants

    torch.manual_seed(0)
    w = torch.randn(48, 64)
    raw = quants.quantize(w.numpy(), GGMLQuantizationType[kind.upper()])
    packed, s = gguf_reader.as_nbits(raw, kind.upper(), 64, compute="fp32")
    lora_a, lora_b = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = int4.linear(x, packed, s) + x @ lora_a.T @ lora_b.T
    y.square().sum().backward()
    got = (x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone())
    for t in (x, lora_a, lora_b):
        t.grad = None
    ref_w = int4.dequantize(packed, s)
    (x @ ref_w.T + x @ lora_a.T @ lora_b.T).square().sum().backward()
    for a, b in zip(got, (x.grad, lora_a.grad, lora_b.grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_gguf_q4_import_equals_ggufs_own_dequantization_bit_for_bit(kind):
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType[kind.upper()])
    packed, s = gguf_reader.as_nbits(raw, kind.upper(), 96)
    theirs = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind.upper()]))
    assert torch.equal(int4.dequantize(packed, s), theirs)
    assert s.source == f"gguf-{kind}" and s.block == 32 and (s.mins is None) == (kind == "q4_0")


def test_q4_1_runs_as_symmetric_matmulnbits_plus_a_block_correction():
    """The export's form of a Q4_1 weight (kernel + correction on x's block sums) is the same product."""
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32) * 0.05
    packed, s = gguf_reader.as_nbits(quants.quantize(w, GGMLQuantizationType.Q4_1), "Q4_1", 128, compute="fp32")
    x = torch.randn(4, 128)
    kernel = _matmul_nbits(x.numpy(), packed, s, accuracy=0)  # no zero points: (q - 8)·scale
    onnx_form = kernel + int4.block_sums(x, 32).numpy() @ nbits_inputs(packed, s)["correction"]
    assert np.abs(onnx_form - (x @ int4.dequantize(packed, s).T).numpy()).max() <= 1e-4
    assert np.abs(int4.linear(x, packed, s).numpy() - onnx_form).max() <= 1e-4


def test_q4_1_rounded_to_integer_zero_points_is_plain_matmulnbits(capsys):
    """--gguf int4: Q4_1's float minimum moves to the nearest step of its block, so the weight is plain
    asymmetric MatMulNBits (no correction product): at most half a step from the stored weight, and Q4_0
    weights are left as they are."""
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32) * 0.05
    q41 = gguf_reader.as_nbits(quants.quantize(w, GGMLQuantizationType.Q4_1), "Q4_1", 128)
    q40 = gguf_reader.as_nbits(quants.quantize(w, GGMLQuantizationType.Q4_0), "Q4_0", 128)
    out = quant._round_q4_1({"a": q41, "b": q40}, quant.QuantConfig("int4", gguf="int4"))
    packed, s = out["a"]
    assert s.mins is None and s.zeros is not None and s.source == "gguf-q4_1-rounded" and out["b"] is q40
    stored, rounded = int4.dequantize(*q41), int4.dequantize(packed, s)
    step = q41[1].scales.repeat_interleave(32, dim=1)
    assert ((rounded - stored).abs() <= step / 2 + 1e-6).all() and not torch.equal(rounded, stored)
    x = torch.randn(4, 128)
    assert np.abs(_matmul_nbits(x.numpy(), packed, s, accuracy=0) - (x @ rounded.T).numpy()).max() <= 1e-4
    assert "1 Q4_1 Linears rounded to int4 with integer zero points" in capsys.readouterr().err


def test_unpermute_rows_inverts_llama_cpp_permutation():
    heads, hd = 3, 8
    w = torch.arange(heads * hd)[:, None].float()
    permuted = w.view(heads, 2, hd // 2, 1).transpose(1, 2).reshape(heads * hd, 1)  # llama.cpp's convert
    assert torch.equal(permuted[gguf_reader.unpermute_rows(heads * hd, heads)], w)


def test_int4_config_errors():
    with pytest.raises(QloraError, match="not a MatMulNBits block size"):
        quant.QuantConfig("int4", block_size=48)
    assert quant.QuantConfig("int4").block_size == 32 and quant.QuantConfig("nf4").block_size == 64
    cfg = quant.QuantConfig("int4", symmetric=True, int4_compute="fp32", head=True, gguf="int4")
    assert quant.QuantConfig.from_metadata(cfg.as_metadata()) == cfg and cfg.base_name == "int4+head"
    assert quant.QuantConfig.from_metadata(quant.QuantConfig("nf4").as_metadata()) == quant.QuantConfig("nf4")
    with pytest.raises(QloraError, match="--gguf: expected one of file, int4"):
        quant.QuantConfig("int4", gguf="q4_0")
    # adapters from before --gguf: --gguf-q4-1 round is int4, exact (or neither recorded) kept Q4_0/Q4_1 only
    old = {k: v for k, v in quant.QuantConfig("int4").as_metadata().items() if k != "quant.gguf"}
    assert quant.QuantConfig.from_metadata({**old, "quant.gguf_q4_1": "round"}).gguf == "int4"
    assert quant.QuantConfig.from_metadata({**old, "quant.gguf_q4_1": "exact"}).gguf == "q4"
    assert quant.QuantConfig.from_metadata(old).gguf == "q4"
    with pytest.raises(QloraError, match="--quant-head: the base is not quantized"):
        quant.QuantConfig("none", head=True)
    with pytest.raises(QloraError, match="--gguf int4: only with --quant int4"):
        quant.QuantConfig("nf4", gguf="int4")


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_trained_run_exports_its_own_bytes_exactly(tiny_llama, tiny_data, tmp_path, symmetric):
    from qlora_rt.config import ExportConfig, TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    run = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), out=str(tmp_path / "run"),
                            quant="int4", symmetric=symmetric, steps=4, batch_size=2, seq_len=64, lr=1e-2,
                            checkpoint_every=0, eval_every=0))
    report = export(ExportConfig(model=str(tiny_llama), adapter=str(run.adapter), out=str(tmp_path / "onnx"),
                                 weights="int4", int4_compute="fp32"))
    assert report["tolerance"] == 1e-3 and report["max_abs_logit_diff"] <= 1e-4  # enforced: no requantization
    assert "int4_relative_weight_error_mean" not in report and report["greedy_agreement"] == 1.0


def _correlated_inputs(K: int, n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) @ (torch.eye(K) + 0.1 * torch.randn(K, K, generator=g))


@pytest.mark.parametrize("K,block", [(64, 32), (96, 64), (72, 16), (300, 256)])
def test_gptq_without_input_statistics_is_round_to_nearest(K, block):
    w = torch.randn(40, K)
    packed, s = int4.quantize(w, block)
    gp, gs = int4.gptq(w, torch.eye(K), block)
    assert torch.equal(packed, gp) and torch.equal(s.scales, gs.scales) and torch.equal(s.zeros, gs.zeros)


@pytest.mark.parametrize("K,block", [(128, 32), (160, 64)])
def test_gptq_keeps_layer_outputs_closer_than_round_to_nearest(K, block):
    w, X = 0.02 * torch.randn(64, K), _correlated_inputs(K)
    H = X.T @ X
    rtn = int4.dequantize(*int4.quantize(w, block))
    packed, s = int4.gptq(w, H, block)
    out = int4.dequantize(packed, s)
    err = lambda d: float((X @ (d - w).T).norm() / (X @ w.T).norm())  # noqa: E731
    assert err(out) < 0.85 * err(rtn), (err(out), err(rtn))
    # the same bytes run in MatMulNBits: the layout is the one `quantize` writes
    y = _matmul_nbits(X[:5].numpy(), packed, s, 0)
    assert np.allclose(y, (X[:5] @ out.T).numpy(), atol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("K", [64, 100])
def test_dequantize_is_the_reference_formula_bit_for_bit_in_fp32_and_bf16(symmetric, K):
    torch.manual_seed(0)
    packed, s = int4.quantize(torch.randn(24, K), 32, symmetric)
    codes = int4.unpack(packed).float()
    zero = 8 if s.zeros is None else s.zeros[..., None].float()
    ref = ((codes - zero) * s.scales[..., None]).flatten(1)[:, :K]
    assert torch.equal(int4.dequantize(packed, s), ref)
    assert torch.equal(int4.dequantize(packed, s, dtype=torch.bfloat16), ref.bfloat16())
    s.mins = torch.randn_like(s.scales)  # GGUF Q4_1: q * scale + min
    ref = (codes * s.scales[..., None] + s.mins[..., None]).flatten(1)[:, :K]
    assert torch.equal(int4.dequantize(packed, s), ref)
