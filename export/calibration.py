"""Calibration for GPTQ rounding: H = Σ xᵀx of each Linear's inputs, on examples like the ones it serves.

A weight that must be requantized to int4 (a merged weight, or a base not trained in int4) is rounded
by `qlora_rt.int4.gptq` with these, so the layer's outputs on such inputs stay close to the trained
model's, not only its weights. The default examples are the run's own training data: after merging,
the adapter's change is small next to an int4 step, and round-to-nearest loses a share of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from qlora_rt.config import TrainConfig, resolve_paths
from qlora_rt.data import collate, load_examples
from qlora_rt.lora import lora_layers


def default_data(adapter: str | None) -> Path | None:
    """The training data named in the run.yaml beside `RUN/adapter`, when both are still there."""
    if not adapter:
        return None
    run_yaml = Path(adapter).parent / "run.yaml"
    if not run_yaml.is_file():
        return None
    values = yaml.safe_load(run_yaml.read_text())
    if not isinstance(values, dict):
        return None
    data = resolve_paths(TrainConfig, {"data": values.get("data")}, run_yaml.parent)["data"]  # relative to run.yaml
    return Path(data) if data and Path(data).is_file() else None


HEAD = "lm_head"  # the output head's key among the Hessians


@torch.no_grad()
def hessians(model: torch.nn.Module, tokenizer, path: Path, names: set[str], examples: int = 64,
             seq_len: int = 256, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], int]:
    """{Linear name: (in, in) Σ xᵀx over the non-padding tokens of the first `examples` examples (64: ~5k tokens on the demo task)}, and the
    token count. The model runs as trained (adapters active), so merged weights see the inputs they serve."""
    data = load_examples(path, tokenizer, seq_len)[0][:examples]
    batches = [collate(data[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(data), batch_size)]

    def run(batch: dict) -> torch.Tensor:
        return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]

    return accumulate(model, names, batches, run)


@torch.no_grad()
def encoder_hessians(model: torch.nn.Module, tokenizer, path: Path, names: set[str], token_types: bool,
                     max_length: int, examples: int = 64, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], int]:
    """As `hessians`, for a classifier: the texts of a classification JSONL file through the whole model."""
    from qlora_rt.classify_data import collate as collate_texts, encode, label_names, read

    rows = read(path, "--calibration")[0][:examples]
    data = encode(rows, tokenizer, max_length, label_names(rows), str(path), token_types=token_types)
    batches = [collate_texts(data[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(data), batch_size)]
    return accumulate(model, names, batches, lambda b: model(**{k: v for k, v in b.items() if k != "labels"}))


def accumulate(model: torch.nn.Module, names: set[str], batches: list[dict], run) -> tuple[dict[str, torch.Tensor], int]:
    """Σ xᵀx of the named Linears' inputs over the batches' non-padding tokens, with `run(batch)` the forward
    (for a decoder it returns the final hidden states, which feed the output head's H)."""
    layers = {n: m for n, m in lora_layers(model).items() if n in names}
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in layers.items()}
    if HEAD in names:  # the output head: its input is the decoder's output (the final norm's)
        d = model.get_output_embeddings().in_features
        H[HEAD] = torch.zeros(d, d)
    keep: list[torch.Tensor] = []  # the current batch's token mask, read by the hooks
    # q/k/v (and gate/up) read the same input tensor: one xᵀx for them. The input is held until the batch
    # ends, so no other tensor can take its address meanwhile.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def pre(_module, args):
            key = args[0].data_ptr()
            if key not in shared:
                x = args[0].detach().float()[keep[0]]  # (tokens, in): padding left out
                shared[key] = (args[0], x.T @ x)
            H[name] += shared[key][1]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            keep[:] = [batch["attention_mask"].bool()]
            shared.clear()
            tokens += int(keep[0].sum())
            hidden = run(batch)
            if HEAD in H:  # not run through the head (a (tokens, vocab) product): its xᵀx is enough
                x = hidden.float()[keep[0]]
                H[HEAD] += x.T @ x
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return H, tokens
