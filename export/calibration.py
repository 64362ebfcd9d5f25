"""Calibration for GPTQ rounding: H = Σ xᵀx of each Linear's inputs, on examples like the ones it serves.

A weight that must be requantized to int4 (a merged weight, or a base not trained in int4) is rounded
by `qlora_rt.base.packed_int4.gptq` with these, so the layer's outputs on such inputs stay close to the trained
model's, not only its weights. The default examples are the run's own training data: after merging,
the adapter's change is small next to an int4 step, and round-to-nearest loses a share of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from qlora_rt.config import ExportConfig, TrainConfig, resolve_paths
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import lora_layers
from qlora_rt.train.text_data import collate, load_examples


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


def calibration_data(cfg: ExportConfig) -> Path | None:
    """Examples like the ones the model serves: --calibration, else the training data of the adapter's run."""
    data = Path(cfg.calibration) if cfg.calibration else default_data(cfg.adapter)
    if cfg.calibration and not data.is_file():
        raise QloraError(f"--calibration: {data} not found")
    return data


HEAD = "lm_head"  # the output head's key among the Hessians


def hessians(model: torch.nn.Module, tokenizer, path: Path, names: set[str], examples: int = 64,
             seq_len: int = 256, batch_size: int = 8) -> tuple[LayerHessians, int]:
    """{Linear name: (in, in) Σ xᵀx over the non-padding tokens of the first `examples` examples (64: ~5k
    tokens on the demo task)}, computed a decoder layer at a time as they are asked for, and the token
    count. The model runs as trained (adapters active), so merged weights see the inputs they serve."""
    data = load_examples(path, tokenizer, seq_len)[0][:examples]
    batches = [collate(data[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(data), batch_size)]
    H = LayerHessians(model, names, batches)
    return H, H.tokens


class _Reached(Exception):
    """Stops a forward once the first decoder layer's inputs are captured."""


class LayerHessians:
    """A decoder's H, one layer at a time, as GPTQ's reference implementation calibrates: the calibration
    batches' hidden states are carried through the trained layers one layer ahead of the export, and a
    layer's H exist only from when its first Linear is asked for until each is popped. All at once they
    would not fit: 352 MB a layer at the Llama-3.2-1B shape (5.6 GB), 1.2 GB at Llama-3.1-8B's (38 GB).

    `pop(name)`/`get(name)` in the export's order (layers in turn, the head last); asking for a layer the
    hidden states have passed is an error."""

    def __init__(self, model: torch.nn.Module, names: set[str], batches: list[dict]) -> None:
        self.model, self.names = model, set(names)
        self.layers = model.get_decoder().layers
        self.linears = lora_layers(model)
        types = {getattr(layer, "attention_type", None) for layer in self.layers}
        if len(types) > 1:  # each layer kind gets its own mask; one captured set of arguments serves one kind
            raise QloraError("--int4-rounding gptq: this model mixes attention kinds across layers (sliding and "
                             "full); calibrate with --int4-rounding rtn")
        self.masks = [b["attention_mask"].bool() for b in batches]
        self.tokens = int(sum(m.sum() for m in self.masks))
        self.hidden, self.kwargs = [], []  # per batch: the next layer's input, and the layer's other arguments
        self._capture(batches)
        self.next = 0  # the layer self.hidden feeds
        self.H: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _capture(self, batches: list[dict]) -> None:
        def stop(_module, args, kwargs):
            self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            self.kwargs.append(dict(kwargs))
            raise _Reached

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                try:
                    self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             use_cache=False)
                except _Reached:
                    pass
        finally:
            handle.remove()
            self.model.train(was_training)

    def _layer_of(self, name: str) -> int:
        if name == HEAD:
            return len(self.layers)
        return int(name.split(".layers.")[1].split(".")[0])

    @torch.no_grad()
    def _advance(self, to: int) -> None:
        """Run the layers from self.next through `to`: each layer's H (its Linears among `names`) are
        accumulated on its inputs while its outputs become the next layer's inputs. Past the last layer,
        the final norm's output gives the head's H."""
        while self.next <= to and self.next <= len(self.layers):
            i = self.next
            if i == len(self.layers):
                if HEAD in self.names:
                    norm = self.model.get_decoder().norm
                    d = self.model.get_output_embeddings().in_features
                    self.H[HEAD] = torch.zeros(d, d)
                    for x, keep in zip(self.hidden, self.masks):
                        y = norm(x).float()[keep]
                        self.H[HEAD] += y.T @ y
                self.hidden = []
            else:
                wanted = {n for n in self.names if n != HEAD and self._layer_of(n) == i}
                layer, outputs = self.layers[i], []
                H, _ = _accumulate({n: m for n, m in self.linears.items() if n in wanted},
                                   [{"attention_mask": m} for m in self.masks],
                                   lambda _b, j: outputs.append(_first(layer(self.hidden[j], **self.kwargs[j]))))
                self.H.update(H)
                self.hidden = outputs
            self.next += 1

    def get(self, name: str, default=None):
        if name not in self.names:
            return default
        if name in self.H:
            return self.H[name]
        if self._layer_of(name) < self.next:
            raise QloraError(f"internal: the H of {name} was asked for after its layer was calibrated and dropped")
        self._advance(self._layer_of(name))
        return self.H.get(name, default)

    def pop(self, name: str, default=None):
        H = self.get(name, default)
        self.H.pop(name, None)
        self.names.discard(name)
        return H


def _first(out):
    """A decoder layer's hidden states: a tensor (transformers 5) or the first of a tuple (4.x)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def encoder_hessians(model: torch.nn.Module, tokenizer, path: Path, names: set[str], token_types: bool,
                     max_length: int, examples: int = 64, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], int]:
    """As `hessians`, for a classifier: the texts of a classification JSONL file through the whole model."""
    from qlora_rt.train.label_data import collate as collate_texts
    from qlora_rt.train.label_data import encode, read

    rows = read(path, "--calibration")[0][:examples]
    labels = sorted({str(r["label"]) for r in rows})  # only the texts matter here
    data = encode(rows, tokenizer, max_length, labels, str(path), token_types=token_types)
    batches = [collate_texts(data[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(data), batch_size)]
    return accumulate(model, names, batches, lambda b: model(**{k: v for k, v in b.items() if k != "labels"}))


def accumulate(model: torch.nn.Module, names: set[str], batches: list[dict],
               run) -> tuple[dict[str, torch.Tensor], int]:
    """Σ xᵀx of the named Linears' inputs over the batches' non-padding tokens, with `run(batch)` the forward
    (an encoder's whole model: small enough for every H at once)."""
    layers = {n: m for n, m in lora_layers(model).items() if n in names}
    was_training = model.training
    model.eval()
    try:
        return _accumulate(layers, batches, lambda b, j: run(b))
    finally:
        model.train(was_training)


def _accumulate(layers: dict[str, torch.nn.Module], batches: list[dict], run) -> tuple[dict[str, torch.Tensor], int]:
    """Σ xᵀx of `layers`' inputs over the batches' non-padding tokens, with run(batch, j) the forward."""
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in layers.items()}
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
    tokens = 0
    try:
        with torch.no_grad():
            for j, batch in enumerate(batches):
                keep[:] = [batch["attention_mask"].bool()]
                shared.clear()
                tokens += int(keep[0].sum())
                run(batch, j)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    return H, tokens
