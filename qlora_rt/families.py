"""The model families, one row each: what every stage asks about a family, in one table.

A stage that differs by family keeps its own module per family (the export's graph body in
export/decoder_export.py and export/encoder_export.py, the training task in qlora_rt/train/tasks.py, the
runtime's Model and Classifier) and looks the family up here, never by comparing its name: a third family
is a module per stage plus one row. Torch-free: the runtime's manifest reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_rt.architectures import ARCHITECTURES


@dataclass(frozen=True)
class Family:
    name: str                       # as exports record it (the manifest's `family`)
    task: str                       # the task it trains and its exports run (`train --task`, the manifest's `task`)
    model_types: tuple[str, ...]    # transformers' `model_type` values that load as this family
    auto_class: str                 # the transformers class a checkpoint loads with
    quantizable_head: bool          # an output head that --quant-head can freeze in 4 bits
    trained_head: bool              # a task head trained in full and saved with each adapter (modules_to_save)
    data: str                       # what its training data looks like, for error messages
    other_data: str                 # what is wrong with another family's data, for error messages
    train_defaults: dict = field(default_factory=dict)  # train's settings where a flag is not given
    manifest_fields: tuple[str, ...] = ()  # what its runtime cannot do without, beyond the common fields


DECODER = Family(
    "decoder", "causal-lm", tuple(ARCHITECTURES), "AutoModelForCausalLM",  # one record each: architectures.py
    quantizable_head=True, trained_head=False,
    data="JSONL lines of text, prompt+completion or messages",
    other_data="has labels: classification trains an encoder (BERT, RoBERTa, DistilBERT, MiniLM, ...)",
    # QLoRA's usual recipe
    train_defaults={"batch_size": 4, "lr": 2e-4, "epochs": 1.0},
    manifest_fields=("kv_heads", "head_dim", "vocab", "max_context", "eos_token_ids", "kv_cache"))
ENCODER = Family(
    "encoder", "classify", ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert"),
    "AutoModelForSequenceClassification",
    quantizable_head=False, trained_head=True,
    data='classification data (lines of {"text": ..., "label": ...})',
    other_data="has no 'label'",
    # a sentence classifier's usual recipe: few examples, a larger batch and rate, 3 epochs (docs/classification.md)
    train_defaults={"batch_size": 32, "lr": 5e-4, "epochs": 3.0},
    manifest_fields=("max_length", "token_type_ids"))

FAMILIES: dict[str, Family] = {f.name: f for f in (DECODER, ENCODER)}
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}
BY_TASK: dict[str, Family] = {f.task: f for f in FAMILIES.values()}
