"""The settings of each verb, as dataclasses: each field is a command-line flag (qlora_rt/flags.py), its
`check` the one validation the CLI and the Python API both run; a run's `run.yaml` is a dump of its
`TrainConfig`. Nothing here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qlora_rt.errors import QloraError
from qlora_rt.families import BY_TASK, Family
from qlora_rt.flags import (  # noqa: F401  (flag, portable_paths, resolve_paths, typed_values: used through here)
    check_name,
    check_values,
    flag,
    option,
    portable_paths,
    require,
    resolve_paths,
    typed_values,
)

QUANT_FORMATS = ("nf4", "fp4", "int4", "none")

# the base settings' values before `auto` existed: what a run.yaml that lacks one of them was trained with
LEGACY = {"quant": "nf4", "gguf": "q4", "quant_head": False, "batch_size": 4, "lr": 2e-4}


def upgraded(saved: dict) -> dict:
    """A run's saved settings in today's names: `gguf_q4_1` (exact | round) became `gguf` (q4 | int4)."""
    if "gguf_q4_1" not in saved:
        return saved
    saved = dict(saved)
    old = saved.pop("gguf_q4_1")
    saved.setdefault("gguf", {"round": "int4"}.get(old, "q4"))
    return saved
GRAD_CHECKPOINTING_FROM = 1e9  # parameters: --grad-checkpointing is on by default from this size

@dataclass
class TrainConfig:
    model: str = option("", "base model: a Hugging Face checkpoint folder, a .gguf file, or a bundled name "
                        "(smollm2-135m, gemma3-270m, all-minilm-l6-v2)", path=True)
    data: str = option("", "training data, JSONL: text | prompt+completion | messages (decoders); text (+text_pair) "
                       "+ label (encoders, --task classify)", path=True)
    out: str = option("", "run folder: adapter/, checkpoint/, metrics.jsonl, run.yaml", path=True)
    eval_data: str | None = option(None, "held-out JSONL: eval loss and perplexity (causal-lm); loss, accuracy, "
                                   "macro-F1 and a confusion matrix (classify)", path=True)
    task: str = option("auto", "causal-lm (decoders: generate, chat) | classify (encoders: a label per text; the "
                       "head is trained in full and saved with the adapter) | auto (classify where the data's "
                       "examples have a 'label')", choices=("auto", *BY_TASK))
    quant: str = option("auto", "4-bit format of the frozen base: int4 (exported byte for byte to onnxruntime's "
                        "fast MatMulNBits: the adapter-aware int4 export runs these very bytes; a GGUF's "
                        "tensors are used as they are, --gguf), nf4/fp4 (bitsandbytes, as QLoRA and PEFT), none = "
                        "plain LoRA, or auto = int4 and, for decoders, --quant-head",
                        choices=("auto", *QUANT_FORMATS))
    double_quant: bool = option(True, "nf4/fp4: quantize the per-block absmax too (QLoRA's double quantization)")
    block_size: int | None = option(None, "weights per quantization block (default: 64 for nf4/fp4, 32 for int4)")
    symmetric: bool = option(False, "int4: one scale per block and zero point 8 (as GGUF Q4_0), not a zero point "
                             "per block")
    int4_compute: str = option("fp32", "int4: the product as training computes it, as onnxruntime's MatMulNBits "
                               "does: fp32 activations (accuracy_level 0: `export --int4-compute fp32` is then this "
                               "model exactly) or int8 activations (accuracy_level 4, emulated: the export's default "
                               "int8 products are then the trained ones; training is slower)",
                               choices=("fp32", "int8"))
    gguf: str = option("auto", "int4 from a GGUF file: file = every tensor exactly as the file stores it (4-bit types "
                       "as 4-bit MatMulNBits, 5-, 6- and 8-bit types as 8-bit, the head too: the model llama.cpp "
                       "runs), int4 = 4 bits with integer zero points (every other type rounded once at load, the "
                       "weight error printed: fewer bytes, another model); auto = file",
                  choices=("auto", "file", "int4"))
    gguf_q4_1: str | None = option(None, "replaced by --gguf (exact: --gguf file; round: --gguf int4)",
                                   choices=("exact", "round"))
    quant_head: bool | None = option(None, "quantize the output head too (frozen, in --quant's format, or as a GGUF "
                                     "stores it; untied from the embedding, which stays in full precision): every "
                                     "int4 export then runs "
                                     "the trained 4-bit head exactly, and decoding reads 8x fewer head bytes. Off: "
                                     "the head stays in the compute dtype, as in QLoRA. Default: on for an int4 "
                                     "decoder")
    rank: int = option(16, "LoRA rank r", at_least=1)
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha/r", above=0)
    dropout: float = option(0.05, "dropout on the adapter's input", at_least=0, below=1)
    rslora: bool = option(False, "rank-stabilized scaling alpha/sqrt(r)")
    targets: str = option("all-linear", "all-linear | attention | comma list of module names (q_proj,v_proj)")
    init: str = option("default", "adapter init: default (B=0, base = quantize(W)); pissa (A, B = top-r singular "
                       "triplets of W, base = quantize(W - s·B·A)); loftq (alternate quantizing and a rank-r SVD "
                       "of the error). pissa/loftq adapters belong to their own residual base, saved with the run",
                       choices=("default", "pissa", "loftq"))
    loftq_iters: int = option(1, "loftq: alternating steps, 1..5", at_least=1, at_most=5)
    svd: str = option("auto", "pissa/loftq: exact SVD, lowrank (randomized, torch.svd_lowrank), or auto (exact up "
                      "to 2048 rows/columns)", choices=("auto", "exact", "lowrank"))
    steps: int | None = option(None, "optimizer steps (default: --epochs 1 for a decoder, 3 for an encoder)",
                               at_least=1)
    epochs: float | None = option(None, "passes over the data, instead of --steps", above=0)
    batch_size: int | None = option(None, "examples per micro-batch (default: 4 for a decoder, 32 for an encoder)",
                                    at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    seq_len: int = option(512, "truncate examples to this many tokens (encoders: at most their position table)",
                          at_least=2)
    packing: bool = option(True, "decoders: pack a micro-batch's examples whole into fewer, fuller rows (up to "
                           "--seq-len tokens), each example attending to itself only, where that computes at least "
                           "1/8 fewer positions than padding them to the longest (examples of mixed lengths): the "
                           "same examples a step, the same loss to fp32 summation order")
    lr: float | None = option(None, "peak learning rate (default: 2e-4 for a decoder, 5e-4 for an encoder)", above=0)
    warmup: float = option(0.03, "warm-up: a fraction of the steps (<1) or a number of steps", at_least=0)
    schedule: str = option("cosine", "the learning rate after warm-up: cosine (down to 0 at the last step) or "
                           "constant (a run extended with --resume --steps then equals a longer run from the "
                           "start)", choices=("cosine", "constant"))
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = off)", at_least=0)
    optim: str = option("adamw", "optimizer (paged_adamw_8bit needs CUDA)", choices=("adamw", "paged_adamw_8bit"))
    seed: int = option(0, "seed for adapter init, data order and dropout", at_least=0)
    grad_checkpointing: bool | None = option(None, "recompute each layer's activations in backward: much less "
                                             "memory, slower steps. Default: on for bases of "
                                             f"{GRAD_CHECKPOINTING_FROM / 1e9:g}B+ parameters, off below")
    eval_every: int = option(50, "evaluate every N steps (0 = only at start and end)", at_least=0)
    checkpoint_every: int = option(50, "checkpoint every N steps and at the end, so a finished run can be "
                                   "extended with --resume (0 = never)", at_least=0)
    log_every: int = option(10, "when not on a terminal, print a progress line every N steps", at_least=1)
    device: str = option("auto", "cuda | cpu | auto", choices=("auto", "cuda", "cpu"))
    dtype: str = option("auto", "compute dtype; auto = bfloat16 on CUDA; on a CPU float32, with the frozen 4-bit "
                        "products in bfloat16 where the CPU has bf16 matrix units (AMX or AVX512-BF16: faster steps, "
                        "docs/benchmarks.md); float32 = fp32 products too",
                    choices=("auto", "float32", "bfloat16"))
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    nproc: int = option(1, "train on N processes (torch.distributed DDP, launched with torchrun for you; NCCL on GPUs, "
                        "gloo on the CPU): the global batch is --batch-size x --grad-accum x N. The same as "
                        "`torchrun --nproc-per-node N -m qlora_rt train ...`", at_least=1)
    fsdp: bool = option(False, "several processes: shard the model across them (PyTorch's FSDP2 `fully_shard`, a "
                        "transformer block a unit): each holds 1/N of the 4-bit base, the adapters, their gradients "
                        "and the optimizer's state, so a base larger than one GPU trains; without it (DDP) each holds "
                        "all of the model. Same updates either way")
    dist_timeout: float = option(1800, "several processes: seconds a rank waits for the others before it stops "
                                 "with an error (a process that died)", above=0)

    def check(self) -> None:
        require(self, "model", "data", "out")
        check_values(self)
        if self.steps is not None and self.epochs is not None:
            raise QloraError("--steps and --epochs: give one, not both")
        if self.gguf_q4_1 is not None:
            raise QloraError(f"--gguf-q4-1 is replaced by --gguf: use --gguf "
                             f"{ {'exact': 'file', 'round': 'int4'}[self.gguf_q4_1]} (file keeps every tensor as the "
                             "GGUF stores it; int4 rounds to 4 bits with integer zero points)")
        if self.fsdp and self.optim == "paged_adamw_8bit":
            raise QloraError("--fsdp with --optim paged_adamw_8bit: bitsandbytes' paged optimizer does not take "
                             "sharded parameters; use --optim adamw (its state is sharded too)")

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "nproc", "gguf_q4_1")}

    def resolved(self, family: Family, previous: dict | None = None) -> TrainConfig:
        """The `auto` base settings made concrete: the format that exports exactly and fast (int4, a GGUF's tensors
        as stored, a decoder's head quantized too). `previous`: a resumed run's saved settings, which an `auto`
        keeps."""
        previous = upgraded(previous or {})

        def pick(name, auto, value):  # a run saved before a setting existed had its old default
            return value if value not in ("auto", None) else previous.get(name, LEGACY[name]) if previous else auto

        quant = pick("quant", "int4", self.quant)
        fam = family.train_defaults  # what training takes where a flag is not given
        length = {}
        if self.steps is None and self.epochs is None:  # a resumed run keeps its own (it saved one, or neither: 1)
            length = {"steps": previous.get("steps"), "epochs": previous.get("epochs")} if previous else \
                {"epochs": fam["epochs"]}
        return replace(self, quant=quant, **length,
                       batch_size=pick("batch_size", fam["batch_size"], self.batch_size),
                       lr=pick("lr", fam["lr"], self.lr),
                       gguf=pick("gguf", "file", self.gguf),
                       quant_head=pick("quant_head", quant == "int4" and family.quantizable_head, self.quant_head))


@dataclass
class MergeConfig:
    model: str = option("", "base model: the checkpoint folder or .gguf the adapter was trained on", path=True)
    adapter: str = option("", "adapter folder (qlora-rt or PEFT layout)", path=True)
    out: str = option("", "output folder for the merged fp32 Hugging Face checkpoint", path=True)
    quant: str | None = option(None, "base format for adapters that do not record one (PEFT): default nf4",
                               choices=QUANT_FORMATS)
    overwrite: bool = option(False, "replace --out if it exists")

    def check(self) -> None:
        require(self, "model", "adapter", "out")
        check_values(self)


@dataclass
class ExportConfig:
    model: str = option("", "base model the adapter was trained on (folder, .gguf, or a bundled name such as "
                        "smollm2-135m)", path=True)
    out: str = option("", "output folder: model.onnx, tokenizer, adapters/, export_report.json", path=True)
    adapter: str | None = option(None, "trained adapter folder (qlora-rt or PEFT layout); none = the base",
                                 path=True)
    quant: str | None = option(None, "the base's 4-bit format where the adapter does not record it: a bare base "
                               "(default: as `train --quant auto`, int4) or a PEFT adapter (default: nf4)",
                               choices=QUANT_FORMATS)
    mode: str = option("adapter-aware", "merged: fold the adapter into the weights; adapter-aware: base + "
                       "LoRA graph inputs, adapters as .onnx_adapter files", choices=("merged", "adapter-aware"))
    weights: str = option("auto", "weight format: fp32 | fp16 | int4 (MatMulNBits: an int4-trained base's own bytes "
                          "and exact; any other base or a merged weight is requantized and its error reported) | "
                          "nf4 (adapter-aware: the trained NF4 bytes in MatMulBnb4) | int8 (every weight and the head "
                          "rounded to int8 per column, computed with dynamic int8 activations: what a browser page "
                          "runs fast, `qlora-rt web`; approximate) | auto (int4 for an int4-trained base, the "
                          "default of `train`; fp32 for any other)",
                          choices=("auto", "fp32", "fp16", "int4", "int8", "nf4"))
    block_size: int | None = option(None, "int4 block size for requantized weights (an int4-trained base keeps its "
                                    "own). Default 32, or twice an int4-trained base's block for a merge (on the "
                                    "base's own grid a merged weight would round back to the base and lose the "
                                    "adapter's change)",
                                    choices=(16, 32, 64, 128, 256))
    requant_bits: str = option("stored", "--weights int4, a requantized (merged) weight: stored = in its base's bits "
                               "(a GGUF's 5-, 6- and 8-bit tensors to 8 bits: less error, more bytes) or 4 = every "
                               "one in 4 bits", choices=("stored", "4"))
    head: str = option("auto", "output head: fp32, int8 (8-bit MatMulNBits with int8 activations: ~1.7x faster "
                       "head, approximate), int4 (4-bit, GPTQ-rounded on the calibration data like the other "
                       "requantized weights: half int8's bytes, more error), or auto (a head trained in 4 bits with "
                       "--quant-head: its own bytes, exact; else int4 where the int4 export is approximate anyway: "
                       "requantized or int8 compute; fp32 where it is exact)",
                       choices=("auto", "fp32", "int8", "int4"))
    int4_compute: str = option("auto", "a trained int4 base's products: int8 (int8 activations, MatMulNBits "
                               "accuracy_level 4: the fast CPU path, ~1.4x a decode step at the 1B shape, and much "
                               "faster decoding several rows at once, as `serve` does; approximate: judged by its "
                               "next-token distributions against the trained model), fp32 (fp32 activations: exactly "
                               "the trained model; what a browser page computes) or auto (a decoder: int8, and fp32 "
                               "where int8 fails the check; an encoder: as trained)",
                               choices=("auto", "fp32", "int8"))
    kv_cache: str = option("fp32", "decoders: the KV cache's type. fp16 halves its memory (a server's rows, a "
                           "device's long context); attention then runs in fp16, which onnxruntime's CPU kernels "
                           "compute slower than fp32 where many rows share a step (docs/benchmarks.md)",
                           choices=("fp32", "fp16"))
    int4_rounding: str = option("gptq", "requantized int4 weights: gptq (error feedback on calibration inputs, keeps "
                                "the layer outputs close) or rtn (round to nearest)", choices=("gptq", "rtn"))
    calibration: str | None = option(None, "JSONL for gptq rounding (default: the training data named in the "
                                     "adapter's run.yaml; none found = round to nearest, said in the report)",
                                     path=True)
    name: str = option("default", "file name for the adapter under adapters/ (adapter-aware)")
    tolerance: float | None = option(None, at_least=0, help="max |logit difference| vs PyTorch before the export fails "
                                     "(default: 1e-3 for the exports that are the trained model: fp32, nf4, int4 of "
                                     "an int4-trained base; the approximate ones are judged by their distributions "
                                     "instead: fp16 to a mean KL of 1e-3 and 98% top-1, requantized int4 to --max-kl "
                                     "and --min-top1)")
    max_kl: float = option(0.2, "approximate exports (requantized int4, int8 activations): the largest mean "
                           "KL(PyTorch || ONNX) of next-token distributions, in nats, over the check prompts and 16 "
                           "calibration examples, before the export fails", at_least=0)
    min_top1: float = option(0.75, "approximate exports: the smallest share of those positions whose most likely "
                             "next token is PyTorch's (encoders: label)", at_least=0, at_most=1)
    ort_format: bool = option(False, "also write model.ort, onnxruntime's ORT format (ORT Mobile and minimal builds), "
                              "and model.required_operators.config, the operators a minimal build must include; "
                              "model.ort is checked against model.onnx, adapter applied")
    overwrite: bool = option(False, "replace --out if it exists (only after the new export verified)")

    def check(self) -> None:
        require(self, "model", "out")
        if self.adapter in ("", "none"):  # the documented spelling of "no adapter" on the command line
            self.adapter = None
        check_values(self)
        check_name(self.name)
        if self.mode == "merged" and self.adapter is None:
            raise QloraError("--mode merged needs --adapter (merging nothing is just the base: use adapter-aware)")
        if self.mode == "merged" and self.weights == "nf4":
            raise QloraError("--mode merged --weights nf4: a merged weight is no longer the trained NF4 base; use "
                             "--weights int4|fp16|fp32, or --mode adapter-aware to keep the NF4 base")


@dataclass
class ExportAdapterConfig:
    adapter: str = option("", "trained adapter folder to add", path=True)
    onnx: str = option("", "an existing adapter-aware export folder", path=True)
    name: str = option("", "name of the adapter file under adapters/")
    overwrite: bool = option(False, "replace an adapter of the same name")

    def check(self) -> None:
        require(self, "adapter", "onnx", "name")
        check_name(self.name)


@dataclass
class RuntimeConfig:
    """What `generate` and `chat` share: the export folder, the adapter, and how to decode."""
    folder: str = option("", "an export folder (written by `qlora-rt export`)", positional=True)
    adapter: str | None = option(None, "adapter: a NAME under FOLDER/adapters/ or a PATH.onnx_adapter; "
                                 "none = the base (adapter-aware exports)")
    system: str | None = option(None, "system message (chat template)")
    max_new_tokens: int = option(128, "stop after this many new tokens", at_least=1)
    temperature: float = option(0.0, "sampling temperature; 0 = greedy", at_least=0)
    top_k: int = option(0, "sample from the k most likely tokens (0 = all)", at_least=0)
    top_p: float = option(1.0, "sample from the smallest set of tokens with this much probability", above=0,
                          at_most=1)
    seed: int | None = option(None, "random seed: the same seed gives the same sample", at_least=0)
    presence_penalty: float = option(0.0, "subtracted from the logit of every token already generated "
                                     "(OpenAI's; -2 to 2)", at_least=-2, at_most=2)
    frequency_penalty: float = option(0.0, "subtracted once per time a token was already generated (OpenAI's; "
                                      "-2 to 2)", at_least=-2, at_most=2)
    threads: int = option(0, "CPU threads for onnxruntime (0 = its default)", at_least=0)
    verbose: bool = option(False, "print time to first token and decode tokens/s")

    def check(self) -> None:
        if not self.folder:
            raise QloraError("FOLDER is required: an export folder written by `qlora-rt export`")
        check_values(self)

    def sampling(self) -> dict:
        return {"adapter": self.adapter, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}


@dataclass
class GenerateConfig(RuntimeConfig):
    prompt: list[str] = option(None, "the prompt; repeat --prompt for a batch (decoded side by side)")
    chat: bool = option(False, "wrap the prompt in the folder's chat template as a user message")
    stop: list[str] = option(None, "stop when the text contains this string (repeatable)")
    stream: bool = option(True, "print tokens as they come (one prompt)")

    def check(self) -> None:
        super().check()
        if not self.prompt:
            raise QloraError("--prompt is required")

    def sampling(self) -> dict:
        return {**super().sampling(), "stop": self.stop or ()}


@dataclass
class ClassifyConfig:
    folder: str = option("", "an encoder export folder (written by `qlora-rt export` from a classifier run)",
                         positional=True)
    adapter: str | None = option(None, "adapter-aware exports: the task, a NAME under FOLDER/adapters/ or a "
                                 "PATH.onnx_adapter, which brings its head and label names (default: the only one)")
    text: list[str] = option(None, "a text to classify; repeat --text for several (one batch)")
    text_pair: list[str] = option(None, "the second text of a pair, one per --text (entailment, question + passage)")
    input: str | None = option(None, "JSONL of {\"text\": ...[, \"text_pair\": ...]} lines to classify", path=True)
    output: str | None = option(None, "with --input: write one {\"label\", \"probs\"} line per input here "
                                "(default: print them)", path=True)
    batch_size: int = option(32, "texts per onnxruntime run", at_least=1)
    threads: int = option(0, "CPU threads for onnxruntime (0 = its default)", at_least=0)

    def check(self) -> None:
        if not self.folder:
            raise QloraError("FOLDER is required: an encoder export folder written by `qlora-rt export`")
        check_values(self)
        if bool(self.text) == bool(self.input):
            raise QloraError("give --text (repeatable) or --input FILE.jsonl, one of the two")
        if self.text_pair and len(self.text_pair) != len(self.text or []):
            raise QloraError(f"--text-pair: {len(self.text_pair)} given for {len(self.text or [])} --text; "
                             "give one per --text")
        if self.output and not self.input:
            raise QloraError("--output goes with --input")


@dataclass
class ChatConfig(RuntimeConfig):
    max_new_tokens: int = option(256, "longest reply, in tokens", at_least=1)


LOOPBACK = ("127.0.0.1", "localhost", "::1")  # a server bound to one of these answers to these Host names only


def host_name(value: str) -> str:
    """The host part of a Host header: [::1]:8000 -> ::1, localhost:8000 -> localhost."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1: value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value
API_KEY_ENV = "QLORA_RT_API_KEY"


@dataclass
class ServeConfig:
    folder: str = option("", "an export folder (decoder: chat and completions; encoder: classification)",
                         positional=True)
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 = every interface: anyone who can reach this "
                       "machine can use the model)")
    port: int = option(8000, "TCP port", at_least=0, at_most=65535)
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on every path but /health (default: "
                                 "no key; a key given here shows in `ps`: prefer --api-key-file or the "
                                 "QLORA_RT_API_KEY environment variable)")
    api_key_file: str | None = option(None, "read the API key from this file (its first line)", path=True)
    allowed_hosts: list[str] = option(None, "a Host header name the server answers to (repeatable; default: with "
                                             "--host on this machine only, 127.0.0.1, localhost and ::1; "
                                             "otherwise any)")
    max_body_mb: int = option(32, "largest request body, in MiB (a chunked one is counted as it arrives)",
                              at_least=1, at_most=4096)
    max_batch: int = option(8, "streams decoded together in one step (rows of the KV cache)", at_least=1,
                            at_most=256)
    max_seq_len: int = option(2048, "longest prompt + reply per stream, in tokens (each stream's KV cache "
                              "holds this many positions)", at_least=2)
    max_queue: int | None = option(None, "requests waiting for a free stream before new ones get 429 "
                                   "(default: 4 x --max-batch)", at_least=0)
    threads: int = option(0, "CPU threads for onnxruntime (0 = its default, one per core)", at_least=0)
    adapters_dir: str | None = option(None, "a folder POST /v1/load_lora_adapter may load .onnx_adapter files "
                                      "from, besides the export's own adapters/", path=True)
    served_model_name: str | None = option(None, "the base model's name in the API (default: the export's base "
                                           "model's name)")

    def check(self) -> None:
        if not self.folder:
            raise QloraError("FOLDER is required: an export folder written by `qlora-rt export`")
        check_values(self)
        if self.adapters_dir and not Path(self.adapters_dir).is_dir():
            raise QloraError(f"--adapters-dir: {self.adapters_dir} is not a folder")
        if self.api_key and self.api_key_file:
            raise QloraError("--api-key and --api-key-file: give one")

    def key(self) -> str | None:
        """The API key: --api-key, else the first line of --api-key-file, else $QLORA_RT_API_KEY."""
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise QloraError(f"--api-key-file: cannot read {self.api_key_file} ({e})") from None
            if not lines or not lines[0].strip():
                raise QloraError(f"--api-key-file: {self.api_key_file} is empty")
            return lines[0].strip()
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def hosts(self) -> tuple[str, ...] | None:
        if self.allowed_hosts:
            return tuple(self.allowed_hosts)
        return LOOPBACK if self.host in LOOPBACK else None


@dataclass
class WebConfig:
    folder: str = option("", "a decoder export folder (adapter-aware: its adapters come along)", positional=True,
                         path=True)
    out: str = option("site", "the site folder to write: index.html, the runtime, vendor/, model/", path=True)
    overwrite: bool = option(False, "replace --out if `qlora-rt web` wrote it")
    node_modules: str | None = option(None, "where the npm packages the page loads are installed (default: "
                                      "qlora_rt/web/node_modules, written by `npm ci` there)", path=True)
    serve: bool = option(False, "then serve the site at http://HOST:PORT/ (Ctrl-C stops)")
    host: str = option("127.0.0.1", "--serve: address to listen on")
    port: int = option(8000, "--serve: TCP port", at_least=0, at_most=65535)

    def check(self) -> None:
        if not self.folder:
            raise QloraError("FOLDER is required: a decoder export folder written by `qlora-rt export`")
        check_values(self)
