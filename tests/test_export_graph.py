"""The op-by-op decoder graph against the PyTorch model it was built from."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_model

from qlora_rt.base import formats
from qlora_rt.export.decoder_graph import DecoderSpec, build_decoder
from qlora_rt.export.graph import Graph
from qlora_rt.export.weight_writers import HeadWriter, add_shared_tensors, group_lora, linear_writer, lora_arrays
from qlora_rt.lora.layers import LoraConfig, add_adapters, lora_layers, quantize_model


def trained(model_type="llama", tie=False, rank=4, seed=0, targets="all-linear"):
    m = make_model(model_type, tie=tie).eval()
    quantize_model(m, formats.QuantConfig("nf4"), torch.device("cpu"))
    names = add_adapters(m, LoraConfig(rank=rank, dropout=0.0, targets=targets))
    torch.manual_seed(seed)
    for layer in lora_layers(m).values():
        if layer.rank:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return m.eval(), names


def session(m, names, mode, weights="fp32"):
    c = m.config
    spec = DecoderSpec(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                       c.head_dim, c.vocab_size, c.rms_norm_eps, c.model_type == "qwen3")
    g = Graph()
    add_shared_tensors(g, m, 256)
    writer = linear_writer(g, m, mode, weights, set(names))
    build_decoder(spec, g, writer, HeadWriter(g, m, weights))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the LoRA inputs' rank-0 defaults are initializers on purpose
    s = ort.InferenceSession(g.model("test").SerializeToString(), opts, providers=["CPUExecutionProvider"])
    s.lora_groups, s.lora_inputs = writer.lora_groups, writer.lora_inputs
    return s, spec


def feed(spec, ids, mask, pos, past=None, lora=None):
    f = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i in range(spec.layers):
        for j, kv in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{kv}"] = past[2 * i + j] if past else np.zeros(
                (ids.shape[0], spec.kv_heads, 0, spec.head_dim), np.float32)
    return {**f, **(lora or {})}


def adapter_feed(m, names, s):
    layers = lora_layers(m)
    return group_lora({n: lora_arrays(layers[n].lora_A.weight, layers[n].lora_B.weight, layers[n].scale)
                       for n in names}, s.lora_groups, s.lora_inputs)


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("mistral", False),
                                            ("qwen2", False), ("qwen3", True)])
@pytest.mark.parametrize("mode", ["merged", "adapter-aware"])
def test_logits_match_pytorch_with_left_padding(model_type, tie, mode):
    m, names = trained(model_type, tie)
    s, spec = session(m, names, mode)
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    lora = adapter_feed(m, names, s) if mode == "adapter-aware" else None
    logits = s.run(["logits"], feed(spec, ids, mask, pos, lora=lora))[0]
    assert np.abs(logits - ref)[mask.numpy().astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("mode", ["merged", "adapter-aware"])
def test_right_padded_rows_decode_as_they_do_alone(mode):
    """onnxruntime-genai's layout: a prompt batch padded on the right ([1 1 0]), then each step's token
    appended to every row's mask ([1 1 0 1]): each row's logits are those of the row run alone."""
    m, names = trained()
    s, spec = session(m, names, mode)
    lora = adapter_feed(m, names, s) if mode == "adapter-aware" else None
    gen = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(1, 320, (2, 7), generator=gen), torch.randint(1, 320, (2, 3), generator=gen)
    lengths = [7, 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    ids = ids * mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(ids, mask, pos, past=None):
        return s.run(None, feed(spec, ids, mask, pos, past=past, lora=lora))

    res = run(ids, mask, pos)
    batch = [[res[0][b, n - 1] for b, n in enumerate(lengths)]]
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        res = run(steps[:, t:t + 1], mask, torch.tensor(lengths)[:, None] + t, past=res[1:])
        batch.append(list(res[0][:, 0]))
    for b, n in enumerate(lengths):
        res = run(ids[b:b + 1, :n], torch.ones(1, n, dtype=torch.long), torch.arange(n)[None])
        alone = [res[0][0, n - 1]]
        for t in range(steps.shape[1]):
            res = run(steps[b:b + 1, t:t + 1], torch.ones(1, n + t + 1, dtype=torch.long), torch.tensor([[n + t]]),
                      past=res[1:])
            alone.append(res[0][0, 0])
        assert max(np.abs(batch[k][b] - alone[k]).max() for k in range(len(alone))) <= 1e-5


def test_kv_cache_decoding_step_by_step_equals_full_forward():
    m, names = trained()
    s, spec = session(m, names, "merged")
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    full = s.run(["logits"], feed(spec, ids, torch.ones_like(ids), torch.arange(10)[None]))[0]
    outputs = [o.name for o in s.get_outputs()]
    res = s.run(None, feed(spec, ids[:, :6], torch.ones(1, 6, dtype=torch.long), torch.arange(6)[None]))
    steps = [res[0]]
    for t in range(6, 10):
        res = s.run(None, feed(spec, ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long),
                               torch.tensor([[t]]), past=res[1:]))
        steps.append(res[0])
    assert outputs[1:3] == ["present.0.key", "present.0.value"] and res[1].shape == (1, spec.kv_heads, 10, 16)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5


def test_rank0_default_is_the_base_and_adapters_of_different_ranks_share_a_session():
    m4, names = trained(rank=4, seed=0)
    s, spec = session(m4, names, "adapter-aware")
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(3))
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]
    from qlora_rt.lora.layers import disabled

    with torch.no_grad(), disabled(m4):
        base = m4(input_ids=ids).logits.numpy()
    assert np.abs(s.run(["logits"], feed(spec, ids, mask, pos))[0] - base).max() <= 1e-4
    m8, names8 = trained(rank=8, seed=5, targets="q_proj,v_proj,up_proj")  # gate left out: zeros in its B
    for model, n in ((m4, names), (m8, names8)):
        with torch.no_grad():
            ref = model(input_ids=ids).logits.numpy()
        got = s.run(["logits"], feed(spec, ids, mask, pos, lora=adapter_feed(model, n, s)))[0]
        assert np.abs(got - ref).max() <= 1e-4


def test_group_lora_stacks_pairs_and_lays_b_block_diagonal():
    """q and v adapted, k not: A is [A_q; A_v] (ranks stacked), B is block-diagonal with zero columns for k."""
    from qlora_rt.errors import QloraError

    rng = np.random.default_rng(0)
    pairs = {n: (rng.normal(size=(r, 8)).astype(np.float32), rng.normal(size=(r, o)).astype(np.float32))
             for n, r, o in (("l.q", 2, 8), ("l.v", 3, 4), ("l.o", 2, 8))}
    groups = {"l.q_k_v": [["l.q", 8], ["l.k", 4], ["l.v", 4]]}
    out = group_lora(pairs, groups)
    assert sorted(out) == ["l.o.lora_A", "l.o.lora_B", "l.q_k_v.lora_A", "l.q_k_v.lora_B"]
    x = rng.normal(size=(5, 8)).astype(np.float32)
    got = x @ out["l.q_k_v.lora_A"].T @ out["l.q_k_v.lora_B"]  # (5, 16)
    np.testing.assert_allclose(got[:, :8], x @ pairs["l.q"][0].T @ pairs["l.q"][1], rtol=1e-5, atol=1e-5)
    assert not got[:, 8:12].any()
    np.testing.assert_allclose(got[:, 12:], x @ pairs["l.v"][0].T @ pairs["l.v"][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(QloraError, match="l.v.lora_B has 5 outputs, this export expects 4"):
        group_lora({"l.v": (np.zeros((1, 8), np.float32), np.zeros((1, 5), np.float32))}, groups)


def test_group_lora_gives_each_member_its_own_b_where_the_export_takes_one():
    """gate/up as an export with a B per member takes them: up adapted at rank 3, gate at rank 2, a third
    member not at all: A's rank blocks are equal (padded with zeros), and x·A_mᵀ·B_m is each member's own
    product, with no block of zeros to read."""
    rng = np.random.default_rng(1)
    pairs = {n: (rng.normal(size=(r, 8)).astype(np.float32), rng.normal(size=(r, 6)).astype(np.float32))
             for n, r in (("l.gate", 2), ("l.up", 3))}
    groups = {"l.gate_up_x": [["l.gate", 6], ["l.up", 6], ["l.x", 6]]}
    inputs = {"l.gate_up_x.lora_A": [None, 8], "l.gate.lora_B": [None, 6], "l.up.lora_B": [None, 6],
              "l.x.lora_B": [None, 6]}
    out = group_lora(pairs, groups, inputs)
    assert sorted(out) == ["l.gate.lora_B", "l.gate_up_x.lora_A", "l.up.lora_B", "l.x.lora_B"]
    assert out["l.gate_up_x.lora_A"].shape == (9, 8) and all(out[f"l.{m}.lora_B"].shape == (3, 6)
                                                             for m in ("gate", "up", "x"))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    blocks = np.split(x @ out["l.gate_up_x.lora_A"].T, 3, axis=1)
    for block, m in zip(blocks, ("gate", "up")):
        np.testing.assert_allclose(block @ out[f"l.{m}.lora_B"], x @ pairs[f"l.{m}"][0].T @ pairs[f"l.{m}"][1],
                                   rtol=1e-5, atol=1e-5)
    assert not (blocks[2] @ out["l.x.lora_B"]).any()
