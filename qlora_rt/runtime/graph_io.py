"""The names of a decoder graph's inputs, outputs and dimensions: one place for the exporter that writes
them (export/decoder_graph.py, weight_writers.py) and the runtime that feeds them. Torch-free.

They follow onnxruntime-genai's builder and Optimum, so that those runtimes (and transformers.js, which
sizes an empty past from the dimension names) load an export as written.
"""

from __future__ import annotations

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # () int64: logits of the last N positions only; 0 (the default) = all
ROW_LENGTHS = "row_lengths"  # (B,) int64, optional: each row's own cache length (a server's independent rows)
# printf patterns, as genai_config.json takes them
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
LORA_MASK = ".lora_mask"  # suffix of a LoRA group's per-row column mask (mixed-adapter batches)

# dimension names, as genai's builder and Optimum write them
BATCH, SEQUENCE = "batch_size", "sequence_length"
PAST_SEQUENCE, TOTAL_SEQUENCE = "past_sequence_length", "total_sequence_length"


def past_names(layers: int) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ..."""
    return [p % i for i in range(layers) for p in (PAST_KEY, PAST_VALUE)]


def present_of(past: str) -> str:
    """The output that a past input's cache comes back as: past_key_values.3.key -> present.3.key."""
    return past.replace("past_key_values.", "present.", 1)
