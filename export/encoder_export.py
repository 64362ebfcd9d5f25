"""The encoder family in the export flow (exporter.py): a classifier's graph with its head, its manifest
(label names, head inputs), and its self-check through the runtime's `Classifier`.

In an adapter-aware export the head is part of each adapter (encoder_graph.py); a bare base is checked
with a throw-away adapter holding the model's current head, so its graph is checked all the same.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from qlora_rt import __version__
from qlora_rt.config import ExportConfig
from qlora_rt.errors import QloraError
from qlora_rt.lora.layers import lora_layers
from qlora_rt.merge import save_tokenizer
from qlora_rt.runtime.classifier import Classifier
from qlora_rt.runtime.manifest import FORMAT, Manifest
from qlora_rt.trained import TrainedModel

from .calibration import calibration_data, encoder_hessians
from .encoder_graph import HeadWriter, add_shared_tensors, build_encoder, head_arrays, spec_of
from .graph import Graph
from .onnx_adapters import SUFFIX, write_adapter
from .verify import distribution_gap
from .weight_writers import LinearWriter, linear_writer

TEXTS = ["a wonderful, moving film", "the battery died after two days and support never answered",
         "it is fine", "Absolutely terrible. Would not buy again!", "ok", "great value for the price",
         "I expected more from this brand, honestly", "five stars"]


class EncoderFamily:
    name = "encoder"

    def __init__(self, cfg: ExportConfig, trained: TrainedModel) -> None:
        if cfg.kv_cache != "fp32":
            raise QloraError(f"--kv-cache {cfg.kv_cache}: {cfg.model} is an encoder, which keeps no KV cache")
        self.cfg, self.trained = cfg, trained
        self.model = trained.loaded.model.eval()
        self.spec = spec_of(self.model)
        info = trained.adapter
        self.labels = (info.labels if info else None) or []
        self.head: HeadWriter | None = None

    def start(self, g: Graph) -> LinearWriter:
        cfg, info = self.cfg, self.trained.adapter
        add_shared_tensors(g, self.model, self.spec)
        adapted = set(info.modules) if info else set(lora_layers(self.model))
        writer = linear_writer(g, self.model, cfg.mode, cfg.weights, adapted, cfg.block_size,
                               requant_bits=cfg.requant_bits,
                               int4_compute=cfg.int4_compute)
        self.head = HeadWriter(g, self.model, self.spec, cfg.mode, self.labels)
        return writer

    def calibration_targets(self, writer: LinearWriter) -> set[str]:
        return {n for n in writer.layers if writer.requantizes(n)}

    def hessians(self, writer: LinearWriter, data: Path, names: set[str]):
        return encoder_hessians(self.model, self.trained.loaded.tokenizer, data, names, self.spec.token_types,
                                min(self.spec.max_length, 128))

    def build(self, g: Graph, writer: LinearWriter) -> None:
        build_encoder(self.spec, g, writer, self.head)

    def manifest(self, writer: LinearWriter) -> Manifest:
        loaded, info, spec, cfg = self.trained.loaded, self.trained.adapter, self.spec, self.cfg
        return Manifest(format=FORMAT, version=__version__, family="encoder", task="classify", mode=cfg.mode,
                        weights=cfg.weights, model_type=spec.model_type, layers=spec.layers, hidden=spec.hidden,
                        heads=spec.heads, base_model=loaded.source, base_fingerprint=loaded.fingerprint,
                        base_quant=self.trained.quant.format,
                        base_residual=info.metadata.get("base.residual") if info else None,
                        pad_token_id=spec.pad_id, max_length=spec.max_length, token_type_ids=spec.token_types,
                        labels=self.labels if cfg.mode == "merged" else None,
                        inputs=["input_ids", "attention_mask"] + (["token_type_ids"] if spec.token_types else []),
                        outputs=["logits", "label_names"], lora_inputs={**writer.lora_inputs, **self.head.inputs},
                        lora_groups=writer.lora_groups)

    def save_files(self, folder: Path, meta: Manifest) -> None:
        save_tokenizer(self.trained.loaded.tokenizer, folder)

    def exact(self, writer: LinearWriter) -> bool:
        return not writer.requant_err and not writer.requant8_err and self.trained.quant.int4_compute == "fp32" \
            and self.cfg.int4_compute in (None, "fp32")

    def check(self, folder: Path, meta: Manifest, adapter_file: Path | None, distributions: bool) -> dict:
        texts, pairs = self._texts()
        if self.cfg.mode == "adapter-aware" and adapter_file is None:
            with tempfile.TemporaryDirectory() as scratch:
                names = [f"LABEL_{i}" for i in range(self.model.config.num_labels)]
                probe = write_adapter(head_arrays(self.head.tensors, names, self.spec.base),
                                      Path(scratch) / f"probe{SUFFIX}", meta)
                report = verify(folder, self.model, probe, texts, pairs)
        else:
            report = verify(folder, self.model, adapter_file, texts, pairs)
        return {**report, "labels": self.labels, "what_agrees": "label distributions"}

    def _texts(self, n: int = 16) -> tuple[list[str], list[str] | None]:
        """Texts (and pairs) like the served ones: the calibration data, else a few sentences."""
        from qlora_rt.train.label_data import read

        data = calibration_data(self.cfg)
        if data is None:
            return TEXTS, None
        rows = read(data, "--calibration")[0][:n]
        return [r["text"] for r in rows], [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None

    def summary_rows(self, r: dict) -> list[tuple[str, object]]:
        return [("labels", ", ".join(r["labels"]) or "each adapter brings its own")]


@torch.no_grad()
def verify(folder: Path, model: torch.nn.Module, adapter: Path | None, texts: list[str],
           pairs: list[str] | None) -> dict:
    """The written folder in the runtime users run it with vs the trained model in PyTorch, on the same token
    ids, in padded batches of 4 (so the masks are checked too)."""
    clf = Classifier(folder)
    diffs, kl, agree = [], [], []
    for i in range(0, len(texts), 4):
        feeds = clf.encode(texts[i:i + 4], pairs[i:i + 4] if pairs else None)
        got = clf.logits(feeds, adapter)
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
        diffs.append(np.abs(got - ref))
        k, t = distribution_gap(ref, got)
        kl.append(k)
        agree.append(t)
    agreement = float(np.concatenate(agree).mean())
    return {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
            "mean_abs_logit_diff": float(np.mean(np.concatenate([d.ravel() for d in diffs]))),
            "mean_kl": float(np.concatenate(kl).mean()), "top1_agreement": agreement, "positions": len(texts),
            "label_agreement": agreement, "examples": len(texts)}
