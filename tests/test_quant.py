import pytest
import torch

from qlora_rt.base import formats
from qlora_rt.errors import QloraError

CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


@pytest.mark.parametrize("fmt,dq", CASES)
def test_quantized_linear_equals_matmul_with_bitsandbytes_dequantization(fmt, dq):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(3, 5, 128)
    qw = formats.quantize(w, formats.QuantConfig(fmt, dq), torch.device("cpu"))
    reference = bnbf.dequantize_4bit(qw.data, qw.quant_state)
    assert torch.equal(formats.dequantize(qw), reference)
    torch.testing.assert_close(formats.linear(x, qw), x @ reference.T, rtol=0, atol=1e-5)
    # the 4-bit weight is an approximation of w, not w itself
    err = (reference - w).abs().mean() / w.abs().mean()
    assert 0.01 < err < 0.2


@pytest.mark.parametrize("fmt,dq", CASES)
def test_quantize_is_deterministic(fmt, dq):
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    cfg = formats.QuantConfig(fmt, dq)
    a, b = formats.quantize(w, cfg, torch.device("cpu")), formats.quantize(w.clone(), cfg, torch.device("cpu"))
    assert torch.equal(a.data, b.data) and torch.equal(formats.dequantize(a), formats.dequantize(b))


def test_double_quant_stores_fewer_bytes_and_none_keeps_weight():
    w = torch.randn(256, 256)
    cpu = torch.device("cpu")
    dq = formats.storage_bytes(formats.quantize(w, formats.QuantConfig("nf4", True), cpu))
    plain = formats.storage_bytes(formats.quantize(w, formats.QuantConfig("nf4", False), cpu))
    assert dq < plain < w.numel() * 4 / 7
    none = formats.quantize(w, formats.QuantConfig("none"), cpu)
    assert torch.equal(formats.dequantize(none), w) and not none.requires_grad


def test_bad_format_and_block_size():
    with pytest.raises(QloraError, match="--quant"):
        formats.QuantConfig("int3")
    with pytest.raises(QloraError, match="--block-size"):
        formats.QuantConfig("nf4", block_size=48)


def test_bitsandbytes_hub_kernel_notice_is_filtered(caplog):
    """bitsandbytes' import-time notice about a hub kernel for its bf16 CPU path is noise for us; other
    bitsandbytes warnings still show."""
    import logging

    import qlora_rt  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "none"])
def test_each_format_object_owns_its_weights(fmt):
    """format_of finds the object that made a weight; it saves and rebuilds it exactly, and it answers the
    exporter's questions (an exact MatMulNBits or MatMulBnb4 form) for its own weights only."""
    torch.manual_seed(2)
    cpu = torch.device("cpu")
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    cfg = formats.QuantConfig(fmt)
    qw = formats.quantize(w, cfg, cpu)
    owner = formats.format_of(qw)
    assert owner is formats.FORMATS[fmt] and formats.is_quantized(qw) == (fmt != "none")
    rebuilt = formats.from_state_tensors(formats.state_tensors(qw), cfg, cpu)
    assert formats.format_of(rebuilt) is owner and torch.equal(formats.dequantize(rebuilt), formats.dequantize(qw))
    torch.testing.assert_close(formats.linear(x, rebuilt), formats.linear(x, qw), rtol=0, atol=0)
    assert (owner.nbits(qw) is not None) == (fmt == "int4")
    assert (owner.bnb4(qw) is not None) == (fmt in ("nf4", "fp4"))
    assert owner.describe(qw) == (fmt if fmt != "none" else "float32")
