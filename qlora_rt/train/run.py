"""QLoRA training: a frozen 4-bit base, fp32 LoRA adapters, and a loop that can stop and resume exactly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from qlora_rt.base.encoders import max_tokens, takes_token_types, train_head
from qlora_rt.base.formats import DEFAULT_BLOCK, QuantConfig, storage_bytes
from qlora_rt.base.linears import linear_names
from qlora_rt.base.load import check_model, family, load
from qlora_rt.base.memory import release_freed_memory
from qlora_rt.config import GRAD_CHECKPOINTING_FROM, LEGACY, TrainConfig, flag, portable_paths
from qlora_rt.errors import QloraError
from qlora_rt.files import write_yaml
from qlora_rt.lora.layers import (
    LoraConfig,
    add_adapters,
    bf16_matrix_units,
    count_parameters,
    lora_layers,
    quantize_model,
    select_targets,
    trainable_parameters,
    use_bf16_products,
)
from qlora_rt.lora.peft_io import save_adapter
from qlora_rt.lora.svd_init import RESIDUAL, InitConfig, Plan, load_residual, save_residual
from qlora_rt.train import checkpoint, distributed, label_data, tasks
from qlora_rt.train.report import peak_memory, table
from qlora_rt.train.text_data import Order, steps_for_epochs


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    eval_metrics: dict | None  # the last evaluation's: loss and perplexity, or loss, accuracy, macro-F1, confusion
    tokens_per_s: float
    peak_memory: str
    trainable: int
    total: int


def _device_and_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise QloraError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device if cfg.device != "auto" else "cpu")
    if cfg.optim == "paged_adamw_8bit" and device.type != "cuda":  # before the run folder is written
        raise QloraError("--optim paged_adamw_8bit needs CUDA; use --optim adamw on the CPU")
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, cfg.dtype)


MIN_TIMED_S = 1.0  # seconds of steps below which a run's tokens/s says nothing (its summary shows none)

# Settings a resume may change: they steer the optimizer and the logging, not what the run has learnt so far
# (a lower --lr after a divergence is the usual one). The change is recorded in metrics.jsonl and run.yaml.
RESUMABLE = ("lr", "warmup", "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every", "log_every",
             "eval_data", "dist_timeout", "grad_checkpointing")
# How long the run is: a resume may extend it (the schedule is recomputed for the new length; the data order
# continues). Shorter than the checkpoint's step is refused once the length in steps is known (_train).
EXTENDABLE = ("steps", "epochs")
# Compared by what they hold, not by how they are spelled: the base by its fingerprint, the data by its digest.
BY_CONTENT = ("model", "data", "out")
# What a run folder holds, temporary names included: a run killed before run.yaml may leave some of them.
RUN_FILES = re.compile(r"\.?(run\.yaml|metrics\.jsonl|checkpoint|adapter|residual_base\.safetensors)"
                       r"(\.tmp.*|\.previous|\.prior)?")


def _run_folder(cfg: TrainConfig, main: bool = True) -> dict | None:
    """The checkpoint progress to resume from, or None to start at step 0.

    A folder whose run stopped before its first checkpoint holds nothing to keep: it starts again in place,
    with or without --resume, instead of being a dead end."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise QloraError(f"--out: {out} is a file; expected a run folder")
    saved = checkpoint.progress(out / "checkpoint")
    started = (out / "run.yaml").exists() or saved is not None
    if not started:
        if cfg.resume:
            raise QloraError(f"--resume: {out / 'run.yaml'} not found; there is no run to continue in {out}")
        foreign = sorted(p.name for p in out.iterdir() if not RUN_FILES.fullmatch(p.name)) if out.exists() else []
        if foreign:  # the run would write adapter/ and checkpoint/ among someone else's files
            raise QloraError(f"--out: {out} holds files that are not a run's ({', '.join(foreign[:3])}"
                             f"{' …' if len(foreign) > 3 else ''}); choose a new or empty folder")
        return None
    if saved is None:
        if (out / "adapter").exists():
            why = "holds a finished run with no checkpoint to continue from" if cfg.resume else "already holds a run"
            raise QloraError(f"--out: {out} {why}; choose another folder")
        if main:  # one process writes the run folder
            print(f"{out}: the run there stopped before its first checkpoint; starting it again from step 0",
                  file=sys.stderr)
            (out / "metrics.jsonl").unlink(missing_ok=True)  # the abandoned attempt's records
        return None
    if not cfg.resume:
        raise QloraError(f"--out: {out} already holds a run; pass --resume to continue it or choose another folder")
    before = saved.get("config") or _read_run_yaml(out / "run.yaml")
    now = cfg.saved()
    # what a run saved before a setting existed had
    defaults = {**TrainConfig(model="-", data="-", out="-").saved(), **LEGACY}
    diff = [f"{k} ({before.get(k)!r} -> {v!r})" for k, v in now.items()
            if k not in RESUMABLE + EXTENDABLE + BY_CONTENT and before.get(k, defaults[k]) != v]
    if diff:
        raise QloraError(f"--resume: settings differ from the run's ({', '.join(diff)}); only "
                         f"{', '.join(flag(k) for k in RESUMABLE)} may change on resume, and --steps or --epochs "
                         "to extend it")
    saved["changed"] = {k: [before.get(k), now[k]] for k in RESUMABLE + EXTENDABLE if before.get(k) != now[k]}
    return saved


def _read_run_yaml(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise QloraError(f"--resume: {path} is unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise QloraError(f"--resume: {path} is empty or not a run's settings (a full disk?) and the checkpoint does "
                         "not record them; write the run's flags back into it (qlora-rt train --help)")
    return saved


def _data_digest(path: str) -> dict:
    """What identifies the training data: a resumed run must read the very same examples in the same order."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()[:16]}


def _check_same_run(saved: dict, fingerprint: str, data: dict, examples: int, cfg: TrainConfig) -> None:
    if saved.get("base") and saved["base"] != fingerprint:
        raise QloraError(f"--resume: --model {cfg.model} is not the base this run was trained on")
    was = saved.get("data")
    if was and (was["sha256"] != data["sha256"] or was.get("examples", examples) != examples):
        raise QloraError(f"--resume: --data {cfg.data} changed since the run started ({was['bytes']:,} -> "
                         f"{data['bytes']:,} bytes, {was.get('examples', '?')} -> {examples} examples): the "
                         "checkpoint's "
                         "place in the data no longer means anything; restore the file or start a new run")


def _apply_schedule(cfg: TrainConfig, optimizer, scheduler) -> None:
    """After loading a checkpoint: the learning-rate settings given now replace the saved ones (the
    scheduler's state holds the old peak; its warm-up/cosine shape is the one built from cfg)."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, shape in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * shape(scheduler.last_epoch), weight_decay=cfg.weight_decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    if cfg.optim == "paged_adamw_8bit":  # CUDA only: checked with the device (_device_and_dtype)
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _resolved(cfg: TrainConfig) -> TrainConfig:
    """The `auto` base settings made concrete for this model; a resumed run keeps what it was trained with."""
    check_model(cfg.model)  # before the model loads: a bad path or file fails in a second, not a minute
    previous = None
    if cfg.resume:
        out = Path(cfg.out)
        saved = checkpoint.progress(out / "checkpoint") if out.is_dir() else None
        previous = (saved or {}).get("config") or (_read_run_yaml(out / "run.yaml")
                                                   if (out / "run.yaml").is_file() else None)
    return cfg.resolved(family(cfg.model) == "encoder", previous)


def preflight(cfg: TrainConfig) -> None:
    """The checks that need no model and would stop every process alike (settings, model files, task, run
    folder), for a launcher to make once before it starts several."""
    cfg.check()
    InitConfig(cfg.init, cfg.loftq_iters, cfg.svd)
    _device_and_dtype(cfg)
    cfg = _resolved(cfg)
    _task(cfg)
    _run_folder(cfg, main=False)


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data`; write the adapter to `cfg.out/adapter`."""
    cfg.check()
    icfg = InitConfig(cfg.init, cfg.loftq_iters, cfg.svd)  # a bad --init fails before the model loads
    auto = cfg.quant == "auto"
    cfg = _resolved(cfg)
    note = None  # said when a new run starts, not before every error
    if auto:
        note = (f"--quant auto: {cfg.quant} base (block {cfg.block_size or DEFAULT_BLOCK[cfg.quant]}"
                f"{', output head in 4 bits too' if cfg.quant_head else ''}): its int4 export runs these very bytes "
                "(fast; exactly this model with --int4-compute fp32); --quant nf4 trains a bitsandbytes/PEFT base")
    device, dtype = _device_and_dtype(cfg)
    d = distributed.setup(device, cfg.dist_timeout)  # torchrun's processes join here; one process runs alone
    if cfg.fsdp and not d.on:  # recorded as it runs: run.yaml says fsdp false
        print("--fsdp: one process, nothing to shard; training unsharded (run.yaml records fsdp: false)",
              file=sys.stderr)
        cfg = replace(cfg, fsdp=False)
    try:
        return _train(cfg, on_step, icfg, device, dtype, d, note)
    except RuntimeError as e:
        if d.on and distributed.lost_peer(e):
            raise QloraError(f"rank {d.rank}: another training process stopped or stopped answering "
                             f"({str(e).splitlines()[0][:120]}); the last checkpoint in {Path(cfg.out) / 'checkpoint'} "
                             "is intact: run the same command with --resume") from None
        raise
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, on_step, icfg: InitConfig, device: torch.device, dtype: torch.dtype,
           d: distributed.Dist, note: str | None = None) -> TrainResult:
    if d.on and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    saved = _run_folder(cfg, d.main)
    out = Path(cfg.out)
    qcfg = QuantConfig(cfg.quant, cfg.double_quant, cfg.block_size, dtype, cfg.symmetric, cfg.int4_compute,
                       cfg.quant_head, cfg.gguf_q4_1)
    lcfg = LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.targets)
    task_name = _task(cfg)
    if task_name == "classify" and cfg.quant_head:
        raise QloraError("--quant-head: a classifier's head is trained in full (saved with the adapter); there is no "
                         "output head to quantize")
    Task = tasks.Classify if task_name == "classify" else tasks.CausalLM
    rows, lines = Task.read(cfg.data, "--data")
    eval_rows, eval_lines = Task.read(cfg.eval_data, "--eval-data") if cfg.eval_data else ([], [])
    labels = label_data.label_names(rows, lines, cfg.data) if task_name == "classify" else None
    data_digest = _data_digest(cfg.data)
    torch.manual_seed(cfg.seed)
    loaded = load(cfg.model, lazy=True, labels=labels)  # decoder Linears are read one at a time as they are quantized
    model, tok = loaded.model, loaded.tokenizer
    task = (tasks.Classify(tok, _max_length(cfg, model), labels, takes_token_types(model.config.model_type))
            if labels else tasks.CausalLM(tok, cfg.seq_len))
    fsdp = cfg.fsdp and d.on
    # FSDP on GPUs: the model is built in host memory and each block moves to the GPU as it is sharded, so
    # no GPU ever holds the whole base
    build = torch.device("cpu") if fsdp else device
    plan = None
    if icfg.method != "default" and saved is None:
        names = set(select_targets(linear_names(model), cfg.targets))
        plan = Plan(icfg, qcfg, cfg.rank, lcfg.scale(), names, build)
    quantize_model(model, qcfg, build, loaded.gguf, plan, loaded.tensors)
    targets = add_adapters(model, lcfg)
    bf16_products = cfg.dtype == "auto" and device.type == "cpu" and bf16_matrix_units() and use_bf16_products(model)
    if d.on:  # dropout differs between ranks, as it does between the examples of one batch
        torch.manual_seed(cfg.seed * 1000 + d.rank)
    head = train_head(model)  # an encoder's classification head (and pooler): trained in full, saved with the adapter
    residual = out / RESIDUAL if icfg.method != "default" else None
    if plan:
        plan.apply(model)
        print(plan.summary(), file=sys.stderr)
    elif residual:  # resuming: the run's own residual base, not a recomputed one
        load_residual(model, residual, qcfg, build, fingerprint=loaded.fingerprint)
    train_set, dropped = task.examples(cfg.data, rows, lines)
    eval_set = task.examples(cfg.eval_data, eval_rows, eval_lines)[0] if eval_rows else []
    data_digest["examples"] = len(train_set)
    total_steps = cfg.steps or steps_for_epochs(cfg.epochs or 1.0, len(train_set), cfg.batch_size, cfg.grad_accum)
    distributed.broadcast_parameters(d, trainable_parameters(model))
    trainable, total = count_parameters(model)
    base_mib = sum(storage_bytes(m.weight) for m in lora_layers(model).values()) / 2**20
    checkpointing = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else total >= GRAD_CHECKPOINTING_FROM
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name; the old one warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if saved is not None:  # the adapter before FSDP shards it; the optimizer's state once it exists
        _check_same_run(saved, loaded.fingerprint, data_digest, len(train_set), cfg)
        distributed.check_world(saved, d)
        found, saved_tensors, saved_state = checkpoint.read(out / "checkpoint")
        checkpoint.restore_weights(found, saved_tensors, model)
    elif d.main:  # a new run: its folder, before FSDP shards the weights the residual base is made of
        out.mkdir(parents=True, exist_ok=True)
        if residual:  # before run.yaml: a run that can be resumed always has its base
            save_residual(model, targets, residual, {"base.fingerprint": loaded.fingerprint, "init": icfg.describe(),
                                                     "init.method": icfg.method, **qcfg.as_metadata()})
        write_yaml(out / "run.yaml", portable_paths(TrainConfig, cfg.saved(), out))
    root = TaskLoss(model, task)  # every forward goes through it: what DDP wraps, FSDP's root
    if fsdp:
        held, whole = distributed.shard(root, model, device)
        release_freed_memory()  # the whole copy each process built: its pages back to the OS
    params = trainable_parameters(model)
    optimizer = _optimizer(cfg, params)
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = int(cfg.warmup) if cfg.warmup >= 1 else math.ceil(cfg.warmup * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps) if cfg.schedule == "cosine" \
        else get_constant_schedule_with_warmup(optimizer, warmup)
    step, order = 0, Order(len(train_set), cfg.seed)
    identity = {"config": cfg.saved(), "base": loaded.fingerprint, "data": data_digest, "world_size": d.world}
    if saved is not None:
        progress = checkpoint.restore_state(saved_state,
                                            lambda state: distributed.load_optimizer(root, optimizer, state),
                                            scheduler, d.rank)
        step, order = progress["step"], Order(len(train_set), cfg.seed, **progress["order"])
        if step >= total_steps:
            raise QloraError(f"--resume: the run in {out} is complete ({step} steps); pass a larger --steps (or "
                             f"--epochs) to extend it" if step == total_steps else
                             f"--resume: the run in {out} is at step {step}, past the {total_steps} steps asked for; "
                             "a run can be extended, not shortened")
        _apply_schedule(cfg, optimizer, scheduler)
        if d.main:
            _drop_metrics_after(out / "metrics.jsonl", step)
        if saved["changed"] and d.main:
            _append_metrics(out / "metrics.jsonl", {"step": step, "resumed_with": saved["changed"]})
            write_yaml(out / "run.yaml", portable_paths(TrainConfig, cfg.saved(), out))
    what = (f"task classify{' (the data has labels)' if cfg.task == 'auto' else ''}: {len(labels)} labels "
            f"({', '.join(labels[:6])}{' …' if len(labels) > 6 else ''}), head {'+'.join(head)} trained in full; "
            if labels else "")
    how = f"FSDP: {held / whole:.0%} of the {whole / 2**20:,.1f} MiB of weights on each" if fsdp else "DDP"
    procs = f" x {d.world} processes ({how}; global batch {cfg.batch_size * cfg.grad_accum * d.world})" if d.on else ""
    if d.main:
        if note and saved is None:
            print(note, file=sys.stderr)
        dropped_note = f" ({dropped} dropped: no target token left after truncation)" if dropped else ""
        print(f"base {loaded.source}: {total / 1e6:.1f}M params, {cfg.quant} linears in {base_mib:,.1f} MiB; {what}"
              f"adapters on {len(targets)} layers, {trainable:,} trainable ({100 * trainable / total:.2f}%); "
              f"{len(train_set)} examples{dropped_note}; "
              f"{total_steps} step{'s' if total_steps != 1 else ''} on {device.type}"
              f"{procs}{'; gradient checkpointing' if checkpointing else ''}"
              f"{'; the 4-bit products in bf16 (this CPU has bf16 matrix units)' if bf16_products else ''}",
              file=sys.stderr)
    distributed.barrier(d)  # the run folder is ready before any rank steps
    loop = _Loop(cfg, root, optimizer, scheduler, params, device, out, on_step, residual, identity, d)
    loop.last_checkpoint = step if saved is not None else None
    return loop.run(train_set, eval_set, order, step, total_steps, loaded, qcfg, lcfg, trainable, total)


def _task(cfg: TrainConfig) -> str:
    """The task: as given, or `classify` where the data's examples have a label; checked against the model."""
    task = cfg.task if cfg.task != "auto" else label_data.detect(cfg.data)
    kind = family(cfg.model)
    if task is None:  # the file cannot say: its reader names what is wrong with it (empty, not UTF-8, ...)
        (label_data.read if kind == "encoder" else tasks.CausalLM.read)(cfg.data, "--data")
        task = "classify" if kind == "encoder" else "causal-lm"
    if task == "classify" and kind != "encoder":
        raise QloraError(f"--task classify: --model {cfg.model} is a decoder; classification trains an encoder "
                         "(BERT, RoBERTa, DistilBERT, MiniLM, ...)")
    if task == "causal-lm" and kind == "encoder":
        raise QloraError(f"--model {cfg.model} is an encoder: it trains on classification data (lines of "
                         '{"text": ..., "label": ...}), and '
                         + (f"--data {cfg.data} has no 'label'" if cfg.task == "auto"
                                                                 else "--task causal-lm needs a decoder"))
    return task


def _max_length(cfg: TrainConfig, model: torch.nn.Module) -> int:
    """--seq-len, within the encoder's position table."""
    return min(cfg.seq_len, max_tokens(model.config))


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _drop_metrics_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget their first, abandoned records (and a
    last line cut short by a kill)."""
    if path.exists():
        lines = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(l + "\n" for l in lines))


class TaskLoss(torch.nn.Module):
    """The model and its task as one module: what DDP wraps and FSDP shards from, so that every forward (and
    so every gradient hook, every gathering of sharded weights) goes through it.
    `self("loss", batch, n_units)` or `self("evaluate", examples, batch_size, device)`."""

    def __init__(self, model: torch.nn.Module, task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, what: str, *args):
        return getattr(self.task, what)(self.model, *args)


class _Loop:
    """The optimizer-step loop; split from `train` only so each piece reads on one screen."""

    def __init__(self, cfg, root: TaskLoss, optimizer, scheduler, params, device, out, on_step, residual,
                 identity: dict, d: distributed.Dist = distributed.Dist()) -> None:
        self.cfg, self.root, self.optimizer, self.scheduler = cfg, root, optimizer, scheduler
        self.model, self.task = root.model, root.task
        self.params, self.device, self.out, self.on_step = params, device, out, on_step
        self.residual = residual  # PiSSA/LoftQ: the run's frozen residual base, shipped with the adapter
        self.identity = identity  # settings, base and data fingerprints: saved with every checkpoint
        self.last_checkpoint: int | None = None
        self.d = d
        self.fsdp = distributed.sharded(root)
        self.forward: torch.nn.Module = root
        if d.on and not self.fsdp:  # only the adapters' gradients are all-reduced; the 4-bit base is not DDP's business
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.forward, device_ids=[device] if device.type == "cuda" else None,
                                                   forward_sync_buffers=False, init_sync=False)

    def _write(self, record: dict) -> None:
        if self.d.main:
            _append_metrics(self.out / "metrics.jsonl", record)

    def _eval(self, eval_set: list, step: int) -> dict | None:
        if not eval_set:
            return None
        was_training = self.model.training
        self.model.eval()
        if self.fsdp:  # through the root, whose forward gathers the weights outside the blocks
            metrics = self.root("evaluate", eval_set, self.cfg.batch_size, self.device)
        else:  # DDP's forward would wait for a backward that evaluation never runs
            metrics = self.task.evaluate(self.model, eval_set, self.cfg.batch_size, self.device)
        self.model.train(was_training)
        self._write({"step": step, **metrics})
        return metrics

    def _diverged(self, step: int, what: str) -> QloraError:
        folder = self.out / "checkpoint"
        if self.last_checkpoint is not None and self.last_checkpoint == step - 1:
            # the newest checkpoint's own weights gave this: resuming from it would only repeat it
            # (rank 0 changes the folder; the others only stop, and their message is rank 0's to give)
            self.last_checkpoint = checkpoint.discard_latest(folder) if self.d.main else None
        kept = (f"the last good checkpoint (step {self.last_checkpoint}) is in {folder}; continue from it with "
                "--resume and a lower --lr" if self.last_checkpoint is not None else
                "no good checkpoint is kept; run the same command with a lower --lr to start again in place")
        return QloraError(f"step {step}: {what} is not finite; training stopped and {kept}")

    def _synced(self, last: bool):
        """Gradients cross processes once a step, on its last micro-batch: FSDP reduce-scatters them, DDP
        all-reduces them (its no_sync before that)."""
        if self.fsdp:
            self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext() if last or not self.d.on or self.fsdp else self.forward.no_sync()

    def _step(self, batches: list[dict], step: int) -> tuple[float, float, int]:
        """One optimizer step over the micro-batches: (loss, grad norm, tokens), over all ranks."""
        d = self.d
        # sum of unit losses / units in the whole step, over every rank: accumulation and processes weigh every
        # token (or example) equally. DDP averages gradients over the ranks: x world undoes that.
        n_units = distributed.all_sum(d, [sum(self.task.units(b) for b in batches)], self.device)[0]
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            last = i == len(batches) - 1
            with self._synced(last):
                loss = self.forward("loss", batch, n_units)
                (loss * d.world).backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        loss_sum, tokens = distributed.all_sum(d, [loss_sum, tokens], self.device)  # NaN anywhere: NaN everywhere
        tokens = int(tokens)
        if not math.isfinite(loss_sum):
            raise self._diverged(step, "the loss")
        norm = distributed.full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf")))
        if not torch.isfinite(norm):
            raise self._diverged(step, "the gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":
            release_freed_memory()  # a step's transient fp32 weights: their pages back to the OS
        return loss_sum, float(norm), tokens

    def _checkpoint(self, step: int, order: Order) -> None:
        rng = distributed.gather(self.d, checkpoint.rng_state())  # each rank's dropout stream
        with distributed.gathered(self.root, self.optimizer) as optimizer_state:
            if self.d.main:
                checkpoint.save(self.out / "checkpoint", self.model, optimizer_state, self.scheduler,
                                {"step": step, "order": order.state(), **self.identity}, rng)
        self.last_checkpoint = step

    def run(self, train_set, eval_set, order, step, total_steps, loaded, qcfg, lcfg, trainable, total) -> TrainResult:
        cfg, model = self.cfg, self.model
        first_eval = self._eval(eval_set, 0) if step == 0 else None
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None if self.d.main else True,
                   dynamic_ncols=True)
        step_time, tokens, loss, last_eval = 0.0, 0, float("nan"), first_eval
        try:
            while step < total_steps:
                # every rank walks the global order and takes its slice of each global micro-batch
                b, r = cfg.batch_size, self.d.rank
                batches = [self.task.collate([train_set[i] for i in order.take(b * self.d.world)[r * b:(r + 1) * b]])
                           for _ in range(cfg.grad_accum)]
                t0 = time.perf_counter()
                loss, norm, n = self._step(batches, step + 1)
                if self.last_checkpoint == step and self.d.main:  # a finite step from the newest checkpoint: good
                    checkpoint.confirm(self.out / "checkpoint")
                step, tokens, step_time = step + 1, tokens + n, step_time + time.perf_counter() - t0
                tps = tokens / step_time  # training throughput: evals and checkpoints not counted
                record = {"step": step, "loss": loss, "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                          "tokens": tokens, "tokens_per_s": tps}
                self._write(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                bar.update(1)
                if bar.disable and self.d.main and (step % cfg.log_every == 0 or step == total_steps):
                    print(f"step {step}/{total_steps}  loss {loss:.4f}  {tps:.0f} tok/s", file=sys.stderr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    last_eval = self._eval(eval_set, step)
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
                    self._checkpoint(step, order)  # and at the end: a finished run can always be extended
                if self.on_step:
                    self.on_step(record)
        except KeyboardInterrupt:
            bar.close()
            then = (f"last checkpoint: step {self.last_checkpoint}; continue with --resume" if self.last_checkpoint
                    else "no checkpoint yet: run the same command again to start over")
            if self.d.main:
                print(f"\ninterrupted at step {step}; {then}", file=sys.stderr)
            raise
        bar.close()
        last_eval = self._eval(eval_set, step) if eval_set else last_eval
        adapter = self.out / "adapter"
        with distributed.gathered(self.root):
            if self.d.main:
                save_adapter(model, adapter, lcfg, qcfg, loaded.source, loaded.fingerprint, self.residual,
                             labels=getattr(self.task, "labels", None))
        distributed.barrier(self.d)  # the adapter is written before any rank returns
        result = TrainResult(adapter, step, loss, last_eval and last_eval["eval_loss"], last_eval,
                             tokens / step_time if step_time >= MIN_TIMED_S else 0.0, peak_memory(self.device),
                             trainable, total)
        if self.d.main:
            print(_summary(result, first_eval, self.task), file=sys.stderr)
        return result


def _summary(r: TrainResult, first_eval: dict | None, task) -> str:
    ev = task.describe
    confusion = r.eval_metrics.get("eval_confusion") if r.eval_metrics else None
    after = f"\nconfusion matrix at the end (held-out data)\n{tasks.confusion_table(confusion, task.labels)}" \
        if confusion else ""
    return table("training summary", [
        ("trainable params", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)"),
        ("steps", f"{r.steps:,}"), ("final train loss", f"{r.train_loss:.4f}"),
        ("eval at start", ev(first_eval)), ("eval at end", ev(r.eval_metrics)),
        ("tokens/s", f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "- (too short to time)"),
        ("peak memory", r.peak_memory), ("adapter", r.adapter),
    ]) + after

