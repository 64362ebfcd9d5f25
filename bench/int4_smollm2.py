"""The int4 format on SmolLM2-135M: the GGUF import is lossless, and a W4A8 model is chaotic.

    python bench/int4_smollm2.py

1. Every decoder Linear imported from the Q4_1 GGUF dequantizes bit for bit to the weight transformers
   reads from the same file (q/k rows un-permuted).
2. With --int4-compute int8 (MatMulNBits accuracy_level 4, emulated), 1e-7 and 1e-6 relative noise on
   the input embeddings moves the PyTorch logits this much: why the export's int8 parity is reported,
   not enforced, and why fp32 compute is the default.
"""

import torch

from qlora_rt.base import formats
from qlora_rt.base.load import load
from qlora_rt.lora.layers import lora_layers, quantize_model

PROMPT = "Rewrite this date in ISO 8601 format: March 5, 2021"


def main() -> None:
    torch.manual_seed(0)
    loaded = load("smollm2-135m")
    model = loaded.model
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    quantize_model(model, formats.QuantConfig("int4", int4_compute="int8"), torch.device("cpu"), loaded.gguf)
    layers = lora_layers(model)
    equal = sum(torch.equal(formats.dequantize(layers[n].weight), w) for n, w in reference.items())
    sources = {layer.weight.int4.source for layer in layers.values()}
    print(f"GGUF import: {equal}/{len(reference)} Linear weights bit-identical to transformers' dequantization "
          f"(sources: {', '.join(sorted(sources))})")
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                add_generation_prompt=True)
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        clean = model(inputs_embeds=emb).logits
        print("| input noise (relative) | max abs dlogit | mean abs dlogit | argmax agreement |\n|---|---|---|---|")
        for eps in (1e-7, 1e-6):
            noisy = model(inputs_embeds=emb * (1 + eps * torch.randn_like(emb))).logits
            d = (clean - noisy).abs()
            agree = (clean.argmax(-1) == noisy.argmax(-1)).float().mean()
            print(f"| {eps:g} | {d.max():.3f} | {d.mean():.3f} | {100 * agree:.1f}% |")


if __name__ == "__main__":
    main()
