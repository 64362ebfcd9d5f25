"""Every decoder architecture (qlora_rt/architectures.py) on a tiny random checkpoint of its real config shape
(head sizes, windows, RoPE bases and scales as the real models have them; layers and width cut down):
PyTorch with LoRA equals transformers + PEFT both ways, both exports pass their exact checks, and a prompt
longer than the sliding window decodes as transformers does through the runtime, the server and
onnxruntime-genai. A row here is what a new architecture needs (docs/architectures.md)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS, genai_greedy, save_checkpoint, served_completion, write_jsonl
from test_adapters import IDS, ours_with_random_adapter, peft_model

from qlora_rt.architectures import ARCHITECTURES
from qlora_rt.base import formats
from qlora_rt.config import ExportConfig, TrainConfig
from qlora_rt.export.exporter import export
from qlora_rt.lora.layers import LoraConfig
from qlora_rt.lora.peft_io import save_adapter
from qlora_rt.runtime import Model
from qlora_rt.train.run import train
from qlora_rt.trained import open_trained

GEMMA3 = dict(  # google/gemma-3-270m's attention: 4 heads of 256, one kv head, window 512, two RoPE bases
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=512,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=1024, tie=True,
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
GEMMA2 = dict(  # google/gemma-2-2b's attention (heads of 256, scalar 256, soft-caps 50 and 30), window cut to 8
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=1024, tie=True)
SMOLLM3 = dict(  # HuggingFaceTB/SmolLM3-3B's: heads of 128, every 4th layer without RoPE, theta 5e6
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=128, no_rope_layers=[1, 1, 1, 0],
    rope_parameters={"rope_type": "default", "rope_theta": 5e6}, tie=True, pad_token_id=0, bos_token_id=1,
    eos_token_id=2)
GRANITE = dict(  # ibm-granite/granite-3.x-2b's multipliers
    embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0)


def longrope(head_dim: int, rotary: float = 1.0, original: int = 36) -> dict:
    """Phi-3.5-mini's kind of rope_parameters, its original length cut to 36: the tests' 32-token prompts start
    on the short factors and decode past 36 onto the long ones."""
    n = int(head_dim * rotary) // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": rotary,
            "original_max_position_embeddings": original, "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 0.9 * i for i in range(n)]}


PHI35 = dict(  # microsoft/Phi-3.5-mini's: heads of 96, as many kv heads, LongRoPE
    num_attention_heads=4, num_key_value_heads=4, head_dim=96, hidden_size=384, max_position_embeddings=256,
    original_max_position_embeddings=36, rope_parameters=longrope(96), pad_token_id=0, bos_token_id=1,
    eos_token_id=2)
PHI4 = dict(  # microsoft/Phi-4-mini's: heads of 128 of which 96 rotate, 3 query heads a kv head, LongRoPE
    num_attention_heads=6, num_key_value_heads=2, head_dim=128, hidden_size=768, max_position_embeddings=256,
    original_max_position_embeddings=36, rope_parameters=longrope(128, 0.75), partial_rotary_factor=0.75,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie=True)
# name -> (model_type, config overrides, the sliding window a long prompt must pass: 0 = none)
TINY = {
    "llama": ("llama", {}, 0),
    "qwen3": ("qwen3", {}, 0),
    "gemma2": ("gemma2", GEMMA2, 8),
    "gemma3": ("gemma3_text", GEMMA3, 512),
    # a scale that is not head_dim's and a window of 4: what the real shape cannot tell apart
    "gemma3-small-window": ("gemma3_text", {**GEMMA3, "head_dim": 16, "query_pre_attn_scalar": 24,
                                            "sliding_window": 4}, 4),
    "smollm3": ("smollm3", SMOLLM3, 0),
    "granite": ("granite", GRANITE, 0),
    "phi3.5": ("phi3", PHI35, 0),
    "phi4-mini": ("phi3", PHI4, 0),
}


def test_every_architecture_has_a_tiny_row():
    assert {model_type for model_type, _, _ in TINY.values()} == set(ARCHITECTURES) - {"mistral", "qwen2"}


def test_the_training_loss_is_the_models_own(tiny):
    """The loss applies the head only where a label is (train/tasks.py), so it must make the logits as the
    model's forward does (Granite divides them, Gemma 2 soft-caps them)."""
    from transformers import AutoModelForCausalLM

    from qlora_rt.train.tasks import CausalLM

    name, model_dir, _, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    with torch.no_grad():
        theirs = model(input_ids=IDS, labels=IDS).loss
        ours = CausalLM.loss(model, batch, IDS.shape[0] * (IDS.shape[1] - 1))
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())


def test_packed_rows_give_each_architecture_the_padded_loss(tiny):
    """`train --packing`: examples packed into one row, each attending to itself (the model's own mask from the
    positions: sliding windows and soft-caps included), give the loss of the same examples right-padded, to fp32
    summation order (the products' shapes differ)."""
    from transformers import AutoModelForCausalLM

    from qlora_rt.train import text_data
    from qlora_rt.train.tasks import CausalLM

    name, model_dir, _, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = torch.cat([IDS, IDS.flip(1)]).tolist()
    examples = [text_data.Example(r[:n], r[:n]) for r, n in zip(rows, (16, 5, 11, 3))]
    padded = text_data.collate(examples, pad_id=0)
    packed = text_data.collate(text_data.pack(examples, capacity=64), pad_id=0)
    assert packed["input_ids"].shape == (1, 35)
    n = text_data.count_targets(padded)
    with torch.no_grad():
        ours, theirs = CausalLM.loss(model, packed, n), CausalLM.loss(model, padded, n)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()), (name, ours, theirs)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    model_type, over, window = TINY[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = save_checkpoint(folder / "model", model_type=model_type, **over)
    with torch.no_grad():  # Gemma's norms start at 0 (= a scale of 1): random ones catch a missed 1 + w
        from safetensors.torch import load_file, save_file

        weights = load_file(str(model / "model.safetensors"))
        for k, v in weights.items():
            if k.endswith("norm.weight"):
                weights[k] = v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k)))
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return request.param, model, window, folder


def test_our_adapter_equals_peft_and_peft_adapters_load_here(tiny):
    name, model, _, folder = tiny
    ours = ours_with_random_adapter(model)
    save_adapter(ours.model, folder / "ours", LoraConfig(rank=4, alpha=8, dropout=0.0), formats.QuantConfig(),
                 str(model), ours.fingerprint)
    assert (ours.model.eval()(input_ids=IDS).logits - peft_model(model, folder / "ours")(input_ids=IDS).logits
            ).abs().max().item() <= 1e-4
    fused = TINY[name][0] == "phi3"  # PEFT's adapters for Phi-3 name the fused Linears
    peft = peft_model(model, r=6, lora_alpha=12, init_lora_weights=False,
                      target_modules=["qkv_proj", "down_proj"] if fused else ["q_proj", "v_proj", "down_proj"])
    peft.save_pretrained(folder / "peft")
    loaded, _, _ = open_trained(model, folder / "peft")
    with torch.no_grad():
        assert (loaded.model.eval()(input_ids=IDS).logits - peft(input_ids=IDS).logits).abs().max().item() <= 1e-4


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' forward with its own KV cache, n argmax steps, end-of-text not special (as ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _long_prompt(runtime: Model, window: int) -> str:
    """Text of more tokens than the sliding window (and a few dozen where there is none)."""
    text, n = CORPUS[0] + " ", max(window + 8, 24)
    while len(runtime.encode(text)) < n:
        text += CORPUS[len(text) % 5] + " "
    return text


@pytest.fixture(scope="module")
def trained(tiny):
    name, model, window, folder = tiny
    rows = [{"prompt": "the capital of france? ", "completion": "paris."}, {"text": CORPUS[0]}] * 12
    write_jsonl(folder / "train.jsonl", rows)
    adapter = train(TrainConfig(model=str(model), data=str(folder / "train.jsonl"), out=str(folder / "run"),
                                steps=3, lr=1e-2, batch_size=2, seq_len=64, eval_every=0,
                                checkpoint_every=0)).adapter
    return tiny, adapter


@pytest.mark.parametrize("mode,weights", [("adapter-aware", "auto"), ("merged", "fp32")])
def test_exports_are_exact_and_decode_past_the_window_as_transformers(trained, mode, weights):
    (name, model, window, folder), adapter = trained
    out = folder / f"onnx-{mode}"
    report = export(ExportConfig(model=str(model), adapter=str(adapter), out=str(out), mode=mode, weights=weights,
                                 int4_compute="fp32"))
    assert report["tolerance"] == 1e-3 and report["max_abs_logit_diff"] <= 1e-3, report
    runtime = Model(out)
    loaded, _, _ = open_trained(str(model), str(adapter))
    ids = runtime.encode(_long_prompt(runtime, window))
    theirs = _greedy(loaded.model.eval(), ids, 12)
    adapter_name = "default" if mode == "adapter-aware" else None
    assert runtime.generate_ids([ids], adapter=adapter_name, max_new_tokens=12, ignore_eos=True)[0].tokens == theirs
    if window:  # the prompt fills the window: its first tokens are out of a sliding layer's reach
        assert len(ids) > window
    original = (getattr(loaded.model.config, "rope_parameters", None) or {}).get("original_max_position_embeddings")
    if original:  # LongRoPE: the prompt on the short factors, the decode passing onto the long ones
        assert len(ids) <= original < len(ids) + len(theirs), (len(ids), len(theirs))


def test_the_server_and_genai_give_the_runtimes_tokens(trained):
    pytest.importorskip("fastapi")
    (name, model, window, folder), adapter = trained
    out = folder / "onnx-serve"
    export(ExportConfig(model=str(model), adapter=str(adapter), out=str(out), int4_compute="fp32"))
    runtime = Model(out)
    text = _long_prompt(runtime, window)
    alone = runtime.generate(text, adapter="default", max_new_tokens=8, ignore_eos=True)
    assert served_completion(out, text, 8) == alone.text
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == ARCHITECTURES[TINY[name][0]].genai
    tokens = genai_greedy(out, runtime.encode(text), 8, "default")
    eos = set(runtime.meta.eos_token_ids)  # genai ends a row at its end-of-text token, then pads it

    def upto_eos(row):
        return row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]
    assert upto_eos(tokens) == upto_eos(alone.tokens)

