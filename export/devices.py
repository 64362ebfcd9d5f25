"""The files that other runtimes look for beside a decoder's model.onnx, so that each loads an export as
written (docs/devices.md):

    genai_config.json       onnxruntime-genai (phones, desktop apps): the graph's I/O names, its sizes, and
                            search defaults from the model's generation config
    config.json             Hugging Face's model config: Optimum's ORTModelForCausalLM, transformers.js (with
                            its "transformers.js_config": the weights file, fp32)
    tokenizer_config.json   a tokenizer class that transformers 4.x and 5.x know (qlora_rt.merge.save_tokenizer)
    model.ort               with --ort-format: onnxruntime's ORT format (ORT Mobile, minimal builds), and
    model.required_operators.config, the operators a minimal build must include
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from qlora_rt.errors import QloraError
from qlora_rt.files import write_json
from qlora_rt.merge import hf_config
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime.manifest import Manifest

GENAI_CONFIG = "genai_config.json"


def _search(gen, context: int) -> dict:
    """genai's search defaults: the model's own generation settings where it has them, genai's elsewhere."""
    def get(key: str, default):
        value = getattr(gen, key, None) if gen is not None else None
        return default if value is None else value

    return {"do_sample": bool(get("do_sample", False)), "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True,
            "repetition_penalty": float(get("repetition_penalty", 1.0)), "temperature": float(get("temperature", 1.0)),
            "top_k": int(get("top_k", 50)), "top_p": float(get("top_p", 1.0))}


def genai_config(meta: Manifest, gen, bos_token_id: int | None) -> dict:
    """onnxruntime-genai's genai_config.json for a decoder export (the fields its model builder writes)."""
    eos = meta.eos_token_ids  # a decoder's manifest always has at least one (manifest._check_values)
    return {
        "model": {
            "bos_token_id": bos_token_id if bos_token_id is not None else eos[0],
            "context_length": meta.max_context,
            "decoder": {
                # errors only: the LoRA inputs' rank-0 defaults are initializers that are also graph inputs on
                # purpose (overridable), and onnxruntime warns once for each of them
                "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
                "filename": "model.onnx",
                "head_size": meta.head_dim, "hidden_size": meta.hidden,
                "inputs": {"input_ids": io.INPUT_IDS, "attention_mask": io.ATTENTION_MASK,
                           "position_ids": io.POSITION_IDS, "past_key_names": io.PAST_KEY,
                           "past_value_names": io.PAST_VALUE},
                "outputs": {"logits": io.LOGITS, "present_key_names": io.PRESENT_KEY,
                            "present_value_names": io.PRESENT_VALUE},
                "num_attention_heads": meta.heads, "num_hidden_layers": meta.layers,
                "num_key_value_heads": meta.kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": meta.pad_token_id if meta.pad_token_id is not None else eos[0],
            "type": meta.model_type,
            "vocab_size": meta.vocab,
        },
        "search": _search(gen, meta.max_context),
    }


def transformers_js_config(meta: Manifest) -> dict:
    """config.json's "transformers.js_config": the graph's weights file, which a browser cannot find by itself
    (transformers.js names it `model.onnx_data`), and the cache's precision."""
    data = [name for name in meta.external_data if name.startswith("model.onnx")]
    return {"use_external_data_format": {"model.onnx": len(data)} if data == ["model.onnx_data"] else {},
            "kv_cache_dtype": meta.kv_cache_dtype or "float32", "dtype": "fp32"}


def write_device_files(folder: Path, meta: Manifest, model: torch.nn.Module, tokenizer) -> None:
    """config.json and genai_config.json (the tokenizer files are `save_tokenizer`'s)."""
    config = hf_config(model)
    config.update({"transformers.js_config": transformers_js_config(meta)})
    config.save_pretrained(folder)
    write_json(folder / GENAI_CONFIG, genai_config(meta, model.generation_config, tokenizer.bos_token_id))


ORT_MODEL, ORT_OPERATORS = "model.ort", "model.required_operators.config"
ORT_TOLERANCE = 1e-4  # max |logit difference| between model.ort and model.onnx: the same graph, optimized offline


def write_ort_format(folder: Path, adapter_file: Path | None) -> float:
    """model.ort (onnxruntime's ORT format: what ORT Mobile and minimal builds load) and the operator list a
    minimal build is made with, by onnxruntime's own converter; then both files run on the same input, with
    the adapter applied where there is one. Returns the largest |logit difference|."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(folder / "model.onnx"),
           "--optimization_style", "Fixed"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (folder / ORT_MODEL).is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QloraError(f"--ort-format: onnxruntime's converter failed ({last[:300]}); nothing was written")
    onnx_logits, ort_logits = (_probe(folder / name, adapter_file) for name in ("model.onnx", ORT_MODEL))
    return float(np.abs(onnx_logits - ort_logits).max())


def _probe(model: Path, adapter_file: Path | None) -> np.ndarray:
    """The logits of one small input (4 tokens, an empty cache) through `model`, with the adapter active."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the LoRA inputs' rank-0 defaults are overridable initializers on purpose
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    sizes = {io.BATCH: 1, io.SEQUENCE: 4, io.TOTAL_SEQUENCE: 4, io.PAST_SEQUENCE: 0, "batch": 1, "sequence": 4}
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in i.shape]
        if i.name == io.INPUT_IDS:
            feed[i.name] = np.arange(1, 5, dtype=np.int64).reshape(shape)
        elif i.name == io.POSITION_IDS:
            feed[i.name] = np.arange(4, dtype=np.int64).reshape(shape)
        elif i.name == io.ATTENTION_MASK:
            feed[i.name] = np.ones(shape, np.int64)
        elif i.name.startswith("past_key_values.") or i.name == "token_type_ids":
            feed[i.name] = np.zeros(shape, {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(i.type,
                                                                                                        np.int64))
    options = ort.RunOptions()
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        options.add_active_adapter(lora)
    return session.run([session.get_outputs()[0].name], feed, options)[0]
