"""The real GGUF files (SmolLM2-135M-Instruct Q4_1; Gemma 3 270M Q4_K_M, which mixes Q5_0, Q4_K, Q8_0, Q6_K and
F32): every quantized tensor imported as stored equals gguf-py's dequantization of the file, bit for bit; and a
model built with train's defaults holds each Linear and the head in its stored type, at the memory of its
codes, not of fp32 weights."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from qlora_rt.base import formats, gguf_reader
from qlora_rt.base import packed_int4 as int4
from qlora_rt.base.load import load, resolve
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import quantize_model

pytestmark = pytest.mark.slow
# the tensor types each file holds, counted with gguf-py (the table)
TYPES = {"smollm2-135m": {"Q4_1": 210, "Q8_0": 1, "F32": 61},
         "gemma3-270m": {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9, "F32": 109}}


def _path(name):
    try:
        return resolve(name)
    except QloraError as e:  # only where its packages cannot install: setup.sh installs them
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list(TYPES))
def test_every_tensor_of_the_file_imports_bit_for_bit(name):
    path = _path(name)
    entries = gguf_reader.index(path)
    assert collections.Counter(e.kind.name for e in entries.values()) == TYPES[name]
    for gname, entry in entries.items():
        kind = entry.kind.name
        if kind in gguf_reader.FLOAT_TYPES:
            continue
        raw = gguf_reader.read(path, gname, entry)
        packed, s = gguf_reader.as_nbits(raw, kind, entry.ne[0])
        rows = max(1, (1 << 22) // entry.ne[0])  # a slice at a time: the embeddings are 49k and 262k rows
        for r0 in range(0, raw.shape[0], rows):
            theirs = torch.from_numpy(np.ascontiguousarray(dequantize(raw[r0:r0 + rows], entry.kind)))
            ours = int4.dequantize(packed[r0:r0 + rows], _rows(s, r0, r0 + rows))
            assert torch.equal(ours, theirs), (gname, kind, r0)


def _rows(s, r0, r1):
    from dataclasses import replace

    return replace(s, scales=s.scales[r0:r1], zeros=None if s.zeros is None else s.zeros[r0:r1],
                   mins=None if s.mins is None else s.mins[r0:r1])


@pytest.mark.parametrize("name", list(TYPES))
def test_the_default_base_holds_each_tensor_in_its_stored_type(name):
    path = _path(name)
    loaded = load(path, lazy=True)
    cfg = formats.QuantConfig("int4", head=True)  # train's defaults for a GGUF decoder: gguf="file"
    model = quantize_model(loaded.model, cfg, torch.device("cpu"), loaded.gguf, tensors=loaded.tensors)
    entries = gguf_reader.index(path)
    kinds = collections.Counter()
    stored = codes = 0
    for mod_name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None or not formats.is_quantized(w):
            continue
        s = w.int4
        kinds[s.source] += 1
        codes += w.numel()
        stored += formats.storage_bytes(w)
        gname = "output.weight" if mod_name == "lm_head" and "output.weight" in entries else None
        if mod_name == "lm_head":
            gname = gname or "token_embd.weight"
            assert s.source == f"gguf-{entries[gname].kind.name.lower()}"
    want = collections.Counter({f"gguf-{k.lower()}": n for k, n in TYPES[name].items() if k != "F32"})
    assert kinds == want  # every Linear and the head (the tied embedding's type) as stored
    params = sum(m.weight.int4.K * m.weight.shape[0] for m in model.modules()
                 if getattr(m, "weight", None) is not None and formats.is_quantized(m.weight))
    assert stored < 1.2 * params  # at most a byte a weight and its scales: not fp32's four
