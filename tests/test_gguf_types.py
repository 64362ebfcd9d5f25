"""Every common GGUF tensor type imported as stored: the weights equal gguf-py's own dequantization bit for bit,
and onnxruntime's MatMulNBits computes the same product from the very codes and scales (qlora_rt/base/gguf_reader.py).

Blocks of the types gguf-py quantizes (Q4_0 .. Q8_0) come from its quantizer; the k-quants' blocks are packed
here from their documented layout: random codes, sub-scales and minimums under a finite fp16 super-scale."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from qlora_rt.base import gguf_reader
from qlora_rt.base import packed_int4 as int4
from tests.test_int4 import _matmul_inputs, _matmul_nbits

TYPES = list(gguf_reader.BLOCK_TYPES)
# byte offsets of each k-quant block's fp16 super-scales (d, and dmin where it has one)
K_FP16 = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def blocks_of(kind: str, rows: int, K: int, seed: int = 0, d: tuple[float, float] = (1e-4, 2e-3)) -> np.ndarray:
    """A (rows, bytes) tensor of GGUF type `kind`, K weights a row (k-quants: super-scales drawn from `d`)."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[kind]
    if kind not in K_FP16:
        return quants.quantize(rng.standard_normal((rows, K)).astype(np.float32) * 0.05, qtype)
    nbytes = gguf_reader.BLOCK_TYPES[kind][2]
    raw = rng.integers(0, 256, (rows, K // 256, nbytes), dtype=np.uint8)
    for at in K_FP16[kind]:
        raw[..., at:at + 2] = (rng.uniform(*d, (rows, K // 256)).astype(np.float16)
                               .view(np.uint8).reshape(rows, K // 256, 2))
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_imports_bit_for_bit_as_gguf_py_dequantizes_it(kind):
    raw = blocks_of(kind, 24, 512)
    packed, s = gguf_reader.as_nbits(raw, kind, 512)
    theirs = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]))
    assert torch.equal(int4.dequantize(packed, s), theirs)
    block, bits = gguf_reader.BLOCK_TYPES[kind][:2]
    assert (s.block, s.bits, s.source, s.K) == (block, bits, f"gguf-{kind.lower()}", 512)
    assert packed.shape == (24, 512 // block, block * bits // 8) and packed.dtype == torch.uint8
    assert (s.mins is not None) == (kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
    # what the product computes from: the symmetric part plus the block correction is the weight
    sym = int4.dequantize(packed, s, symmetric_part=True)
    if s.mins is not None:
        sym = sym + s.correction.repeat_interleave(block, 1)
    assert torch.allclose(sym, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", TYPES)
def test_matmulnbits_runs_each_type_from_the_stored_codes(kind):
    """The export's form: MatMulNBits at `bits` (fp32 activations) plus, for float minimums, the correction
    on x's block sums; within fp32 rounding of x @ W.T on the file's weights. The training product too."""
    from qlora_rt.export.int4_weights import nbits_inputs

    raw = blocks_of(kind, 40, 256, seed=1)
    packed, s = gguf_reader.as_nbits(raw, kind, 256)
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    y = _matmul_nbits(x.numpy(), packed, s, 0)
    if s.mins is not None:
        y = y + int4.block_sums(x, s.block).numpy() @ nbits_inputs(packed, s)["correction"]
    ref = (x.double() @ w.double().T).numpy()
    scale = np.abs(ref).max()  # fp32 sums of 256 products: ~1e-6 of the largest output (5 seeds here: <= 1.8e-6)
    assert np.abs(y - ref).max() <= 1e-5 * scale
    assert np.abs(int4.linear(x, packed, s).double().numpy() - ref).max() <= 1e-5 * scale
    if s.bits == 8:  # the fp32-activation export's form: two 4-bit products of the code's halves
        from dataclasses import replace

        from qlora_rt.export.int4_weights import nibble_halves

        halves = nibble_halves(nbits_inputs(packed, s))
        four = replace(s, bits=4, zeros=None, mins=None)
        y2 = sum(_matmul_inputs(x.numpy(), h, four) for h in halves)
        if s.mins is not None:
            y2 = y2 + int4.block_sums(x, s.block).numpy() @ nbits_inputs(packed, s)["correction"]
        assert np.abs(y2 - ref).max() <= 1e-5 * scale


def test_a_file_gives_each_linear_and_the_head_in_its_own_type(tmp_path):
    """stored_linears on a GGUF file of mixed types: each block-type Linear as stored (q/k rows back in Hugging
    Face order for llama), the head from the tied embedding; a float Linear is named for the caller instead."""
    from types import SimpleNamespace

    import gguf

    from qlora_rt.base.gguf_reader import stored_linears, unpermute_rows

    tensors = {"blk.0.attn_q.weight": ("Q4_K", 64), "blk.0.attn_k.weight": ("Q6_K", 32),
               "blk.0.attn_v.weight": ("Q5_0", 32), "token_embd.weight": ("Q8_0", 100)}
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    raws = {}
    for i, (name, (kind, rows)) in enumerate(tensors.items()):
        raws[name] = blocks_of(kind, rows, 256, seed=i)
        writer.add_tensor(name, raws[name], raw_dtype=GGMLQuantizationType[kind])
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((8, 256), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = SimpleNamespace(model_type="llama", num_attention_heads=4, num_key_value_heads=2)
    got, other = stored_linears(tmp_path / "m.gguf", config, head=True)
    assert other == ["model.layers.0.mlp.up_proj"]
    names = {"blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj", 4),
             "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj", 2),
             "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj", None), "token_embd.weight": ("lm_head", None)}
    for gname, (name, heads) in names.items():
        w = torch.from_numpy(quants.dequantize(raws[gname], GGMLQuantizationType[tensors[gname][0]]))
        if heads:
            w = w[unpermute_rows(w.shape[0], heads)]
        packed, s = got[name]
        assert torch.equal(int4.dequantize(packed, s), w), name
    only4, other = stored_linears(tmp_path / "m.gguf", config, kinds=("Q4_0", "Q4_1", "Q4_K"))
    assert set(only4) == {"model.layers.0.self_attn.q_proj"} and len(other) == 3


def test_a_base_of_every_type_exports_exactly_and_its_int8_form_passes_its_check(tmp_path):
    """A small decoder whose Linears and head each hold one GGUF type (cycling through all eight; the q/k/v and
    gate/up groups mix types, so the exporter meets fused and unfused products, corrections and 8-bit halves):
    the exact export (fp32 activations) equals PyTorch within the export's own tolerance, and export's default
    (int8 activations) passes its gate. Rows of 256 so the k-quants fit."""
    from conftest import save_checkpoint

    from qlora_rt.base import formats
    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.lora.layers import lora_layers, output_head
    from qlora_rt.trained import open_trained

    folder = save_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, head_dim=64)
    trained = open_trained(str(folder), None, "int4")
    model = trained.loaded.model
    layers = [*lora_layers(model).values(), output_head(model)]
    seen = set()
    for i, layer in enumerate(layers):
        kind = TYPES[i % len(TYPES)]
        w = formats.dequantize(layer.weight).numpy()
        if kind in K_FP16:  # hand-packed blocks: random codes and sub-scales, weights of the model's size (~0.02)
            raw = blocks_of(kind, w.shape[0], w.shape[1], seed=i, d=(1e-5, 3e-5))
        else:
            raw = quants.quantize(w, GGMLQuantizationType[kind])
        imported = gguf_reader.as_nbits(raw, kind, w.shape[1])
        layer.weight = formats.quantize(None, trained.quant, torch.device("cpu"), imported)
        assert torch.equal(formats.dequantize(layer.weight),
                           torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind])))
        seen.add(kind)
    assert seen == set(TYPES)
    exact = export(ExportConfig(model=str(folder), out=str(tmp_path / "exact"), int4_compute="fp32"), trained)
    assert exact["tolerance"] is not None and exact["max_abs_logit_diff"] <= exact["tolerance"], exact
    default = export(ExportConfig(model=str(folder), out=str(tmp_path / "default")), trained)
    assert default["int4_activations"] == "int8" and default["mean_kl"] <= default["max_kl"], default
