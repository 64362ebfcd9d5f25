"""QLoRA training: a frozen 4-bit base, fp32 LoRA adapters, and a loop that can stop and resume exactly.

`train(cfg)` checks the settings and joins the processes; a `Trainer` then works as torchtune's recipes do:
`setup()` reads the data, builds the model (`_setup_model`, which returns what it built), the optimizer and
its schedule, and restores a checkpoint; `train()` runs the steps. The run folder and its resume rules are
qlora_rt/train/run_folder.py, the tasks (causal LM, classifier) qlora_rt/train/tasks.py, a family's
settings a row of qlora_rt/families.py.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora_rt.base import formats
from qlora_rt.base.encoders import train_head
from qlora_rt.base.formats import DEFAULT_BLOCK, QuantConfig, storage_bytes
from qlora_rt.base.linears import linear_names
from qlora_rt.base.load import Loaded, check_model, family, load
from qlora_rt.base.memory import release_freed_memory
from qlora_rt.config import GRAD_CHECKPOINTING_FROM, TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.families import BY_TASK
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
from qlora_rt.train.run_folder import RunFolder, data_digest
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
    previous = RunFolder(cfg.out).previous_settings() if cfg.resume else None
    return cfg.resolved(family(cfg.model), previous)


def preflight(cfg: TrainConfig) -> None:
    """The checks that need no model and would stop every process alike (settings, model files, task, run
    folder), for a launcher to make once before it starts several."""
    cfg.check()
    InitConfig(cfg.init, cfg.loftq_iters, cfg.svd)
    _device_and_dtype(cfg)
    cfg = _resolved(cfg)
    _task(cfg)
    RunFolder(cfg.out, main=False).open(cfg)


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data`; write the adapter to `cfg.out/adapter`."""
    cfg.check()
    icfg = InitConfig(cfg.init, cfg.loftq_iters, cfg.svd)  # a bad --init fails before the model loads
    auto = cfg.quant == "auto"
    cfg = _resolved(cfg)
    note = None  # said when a new run starts, not before every error
    if auto:
        stored = cfg.quant == "int4" and cfg.gguf == "file" and check_model(cfg.model)[0].is_file()
        base = ("the GGUF's tensors as it stores them (4-bit types in 4 bits, 5-, 6- and 8-bit types in 8"
                f"{', the output head too' if cfg.quant_head else ''})" if stored else
                f"{cfg.quant} base (block {cfg.block_size or DEFAULT_BLOCK[cfg.quant]}"
                f"{', output head in 4 bits too' if cfg.quant_head else ''})")
        note = (f"--quant auto: {base}: its int4 export runs these very bytes (fast; exactly this model with "
                "--int4-compute fp32); --quant nf4 trains a bitsandbytes/PEFT base")
    device, dtype = _device_and_dtype(cfg)
    d = distributed.setup(device, cfg.dist_timeout)  # torchrun's processes join here; one process runs alone
    if cfg.fsdp and not d.on:  # recorded as it runs: run.yaml says fsdp false
        print("--fsdp: one process, nothing to shard; training unsharded (run.yaml records fsdp: false)",
              file=sys.stderr)
        cfg = replace(cfg, fsdp=False)
    trainer = None
    try:
        trainer = Trainer(cfg, icfg, device, dtype, d, note)
        trainer.setup()
        return trainer.train(on_step)
    except RuntimeError as e:
        if d.on and distributed.lost_peer(e):
            raise QloraError(f"rank {d.rank}: another training process stopped or stopped answering "
                             f"({str(e).splitlines()[0][:120]}); the last checkpoint in {Path(cfg.out) / 'checkpoint'} "
                             "is intact: run the same command with --resume") from None
        raise
    finally:
        if trainer is not None:  # the folder is free for the next run as soon as this one returns
            trainer.folder.unlock()
        distributed.teardown(d)


def _task(cfg: TrainConfig) -> str:
    """The task: as given, or the one the data's first example is for; checked against the model's family."""
    fam = family(cfg.model)
    task = cfg.task if cfg.task != "auto" else label_data.detect(cfg.data)
    if task is None:  # the file cannot say: its reader names what is wrong with it (empty, not UTF-8, ...)
        tasks.TASKS[fam.task].read(cfg.data, "--data")
        task = fam.task
    if task != fam.task:
        wanted = BY_TASK[task]
        if cfg.task == "auto":  # the data is another family's
            raise QloraError(f"--model {cfg.model} is {_a(fam.name)}: it trains on {fam.data}, and --data {cfg.data} "
                             f"{fam.other_data}")
        raise QloraError(f"--task {task}: --model {cfg.model} is {_a(fam.name)}; --task {task} needs {_a(wanted.name)} "
                         f"({', '.join(wanted.model_types)})")
    return task


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class Data:
    """What `Trainer._setup_data` read: the rows before the tokenizer exists, and the data's identity."""
    task: type
    rows: list[dict]
    lines: list[int]
    eval_rows: list[dict]
    eval_lines: list[int]
    labels: list[str] | None
    digest: dict


@dataclass
class Built:
    """What `Trainer._setup_model` built: the quantized model with its adapters, and what came with it."""
    loaded: Loaded
    model: torch.nn.Module
    targets: list[str]              # the module names that carry an adapter
    head: list[str]                 # a classifier's head modules, trained in full
    residual: Path | None           # PiSSA/LoftQ: the run's frozen residual base
    bf16_products: bool             # the 4-bit products in bf16 (a CPU with bf16 matrix units)
    checkpointing: bool             # gradient checkpointing
    trainable: int                  # parameters trained
    total: int                      # parameters in all (a 4-bit weight counts its logical size)


class Trainer:
    """One run: `setup()` then `train()`. It owns the model, the optimizer and its schedule, the data order,
    the step, and the run folder it writes."""

    def __init__(self, cfg: TrainConfig, icfg: InitConfig, device: torch.device, dtype: torch.dtype,
                 d: distributed.Dist, note: str | None = None) -> None:
        if d.on and device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        self.cfg, self.icfg, self.device, self.d, self.note = cfg, icfg, device, d, note
        self.folder = RunFolder(cfg.out, d.main)
        self.qcfg = QuantConfig(cfg.quant, cfg.double_quant, cfg.block_size, dtype, cfg.symmetric, cfg.int4_compute,
                                cfg.quant_head, cfg.gguf)
        self.lcfg = LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.targets)
        self.fsdp = cfg.fsdp and d.on
        self.last_checkpoint: int | None = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        self.saved = self.folder.open(cfg)  # the checkpoint's progress, or None: a new run
        if d.main:  # one writer: a second run (or resume) on a folder in use stops here, before any work
            self.folder.lock()
        data = self._setup_data()
        torch.manual_seed(cfg.seed)
        built = self.built = self._setup_model(data)
        self.model = built.model
        self.task = data.task.build(built.loaded.tokenizer, self.model, cfg.seq_len, data.labels)
        self.train_set, dropped = self.task.examples(cfg.data, data.rows, data.lines)
        self.eval_set = self.task.examples(cfg.eval_data, data.eval_rows, data.eval_lines)[0] if data.eval_rows else []
        data.digest["examples"] = self.examples = len(self.train_set)
        self.total_steps = cfg.steps or steps_for_epochs(cfg.epochs or 1.0, len(self.train_set), cfg.batch_size,
                                                         cfg.grad_accum)
        distributed.broadcast_parameters(d, trainable_parameters(self.model))
        self.trainable, self.total = built.trainable, built.total
        saved_state = self._open_run(built, data)
        self.root = TaskLoss(self.model, self.task)  # every forward goes through it: what DDP wraps, FSDP's root
        held = whole = 0
        if self.fsdp:
            held, whole = distributed.shard(self.root, self.model, self.device)
            release_freed_memory()  # the whole copy each process built: its pages back to the OS
        self.params = trainable_parameters(self.model)
        self._setup_optimizer()
        self.step, self.order = 0, Order(len(self.train_set), cfg.seed)
        self.identity = {"config": cfg.saved(), "base": built.loaded.fingerprint, "data": data.digest,
                         "world_size": d.world}
        if self.saved is not None:
            self._restore(saved_state)
        self._announce(data, dropped, held, whole)
        self.forward: torch.nn.Module = self.root
        if d.on and not self.fsdp:  # only the adapters' gradients are all-reduced; the 4-bit base is not DDP's
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.forward, device_ids=[self.device] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, init_sync=False)
        distributed.barrier(d)  # the run folder is ready before any rank steps

    def _setup_data(self) -> Data:
        cfg = self.cfg
        task_name = _task(cfg)
        if not BY_TASK[task_name].quantizable_head and cfg.quant_head:
            raise QloraError("--quant-head: a classifier's head is trained in full (saved with the adapter); there is "
                             "no output head to quantize")
        task = tasks.TASKS[task_name]
        rows, lines = task.read(cfg.data, "--data")
        eval_rows, eval_lines = task.read(cfg.eval_data, "--eval-data") if cfg.eval_data else ([], [])
        labels = task.read_labels(rows, lines, cfg.data)
        return Data(task, rows, lines, eval_rows, eval_lines, labels, data_digest(cfg.data))

    def _setup_model(self, data: Data) -> Built:
        """The base loaded and quantized, its adapters attached (or a checkpoint's residual base restored)."""
        cfg, d, qcfg, lcfg, icfg = self.cfg, self.d, self.qcfg, self.lcfg, self.icfg
        loaded = load(cfg.model, lazy=True, labels=data.labels)  # Linears are read one at a time as they are quantized
        model = loaded.model
        # FSDP on GPUs: the model is built in host memory and each block moves to the GPU as it is sharded, so
        # no GPU ever holds the whole base
        build = torch.device("cpu") if self.fsdp else self.device
        plan = None
        if icfg.method != "default" and self.saved is None:
            names = set(select_targets(linear_names(model), cfg.targets))
            plan = Plan(icfg, qcfg, cfg.rank, lcfg.scale(), names, build)
        quantize_model(model, qcfg, build, loaded.gguf, plan, loaded.tensors)
        targets = add_adapters(model, lcfg)
        bf16 = (cfg.dtype == "auto" and self.device.type == "cpu" and bf16_matrix_units()
                and use_bf16_products(model) > 0)
        if d.on:  # dropout differs between ranks, as it does between the examples of one batch
            torch.manual_seed(cfg.seed * 1000 + d.rank)
        head = train_head(model)  # a classifier's head (and pooler): trained in full, saved with the adapter
        residual = self.folder.path / RESIDUAL if icfg.method != "default" else None
        if plan:
            plan.apply(model)
            print(plan.summary(), file=sys.stderr)
        elif residual:  # resuming: the run's own residual base, not a recomputed one
            load_residual(model, residual, qcfg, build, fingerprint=loaded.fingerprint)
        trainable, total = count_parameters(model)
        checkpointing = (cfg.grad_checkpointing if cfg.grad_checkpointing is not None
                         else total >= GRAD_CHECKPOINTING_FROM)
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name; the old one warns there
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return Built(loaded, model, targets, head, residual, bf16, checkpointing, trainable, total)

    def _open_run(self, built: Built, data: Data) -> dict | None:
        """A resumed run: its base and data checked, its adapter restored (before FSDP shards it); returns the
        checkpoint's optimizer state for later. A new run: its folder, run.yaml and residual base written."""
        cfg, d, folder = self.cfg, self.d, self.folder
        if self.saved is not None:
            folder.check_same_run(self.saved, built.loaded.fingerprint, data.digest, self.examples, cfg)
            distributed.check_world(self.saved, d)
            found, saved_tensors, saved_state = checkpoint.read(folder.checkpoint)
            passed = checkpoint.passed_over(folder.checkpoint) if d.main else None
            if passed:
                print(f"--resume: {passed}", file=sys.stderr)
            checkpoint.restore_weights(found, saved_tensors, self.model)
            return saved_state
        if d.main:  # before FSDP shards the weights the residual base is made of
            folder.path.mkdir(parents=True, exist_ok=True)
            folder.lock()  # a new run's folder exists from here
            if built.residual:  # before run.yaml: a run that can be resumed always has its base
                save_residual(self.model, built.targets, built.residual,
                              {"base.fingerprint": built.loaded.fingerprint, "init": self.icfg.describe(),
                               "init.method": self.icfg.method, **self.qcfg.as_metadata()})
            folder.write_settings(cfg)
        return None

    def _setup_optimizer(self) -> None:
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        cfg = self.cfg
        self.optimizer = _optimizer(cfg, self.params)
        warmup = int(cfg.warmup) if cfg.warmup >= 1 else math.ceil(cfg.warmup * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps) \
            if cfg.schedule == "cosine" else get_constant_schedule_with_warmup(self.optimizer, warmup)

    def _restore(self, saved_state: dict) -> None:
        """The optimizer, schedule, data order and step of the checkpoint; the length may have grown."""
        cfg, out = self.cfg, self.folder.path
        progress = checkpoint.restore_state(saved_state,
                                            lambda state: distributed.load_optimizer(self.root, self.optimizer, state),
                                            self.scheduler, self.d.rank)
        self.step, self.order = progress["step"], Order(len(self.train_set), cfg.seed, **progress["order"])
        if self.step >= self.total_steps:
            raise QloraError(f"--resume: the run in {out} is complete ({self.step} steps); pass a larger --steps (or "
                             f"--epochs) to extend it" if self.step == self.total_steps else
                             f"--resume: the run in {out} is at step {self.step}, past the {self.total_steps} steps "
                             "asked for; a run can be extended, not shortened")
        _apply_schedule(cfg, self.optimizer, self.scheduler)
        self.folder.drop_records_after(self.step)
        if self.saved["changed"] and self.d.main:
            self.folder.record({"step": self.step, "resumed_with": self.saved["changed"]})
            self.folder.write_settings(cfg)
        self.last_checkpoint = self.step

    def _announce(self, data: Data, dropped: int, held: int, whole: int) -> None:
        cfg, d, built, labels = self.cfg, self.d, self.built, data.labels
        if not d.main:
            return
        what = (f"task classify{' (the data has labels)' if cfg.task == 'auto' else ''}: {len(labels)} labels "
                f"({', '.join(labels[:6])}{' …' if len(labels) > 6 else ''}), head {'+'.join(built.head)} trained in "
                "full; " if labels else "")
        how = f"FSDP: {held / whole:.0%} of the {whole / 2**20:,.1f} MiB of weights on each" if self.fsdp else "DDP"
        procs = f" x {d.world} processes ({how}; global batch {cfg.batch_size * cfg.grad_accum * d.world})" \
            if d.on else ""
        base_mib = sum(storage_bytes(m.weight) for m in lora_layers(self.model).values()) / 2**20
        types = formats.types_of(self.model)
        kinds = "" if len(types) <= 1 else " [" + ", ".join(f"{n} {t}" for t, n in types.items()) + "]"
        if self.note and self.saved is None:
            print(self.note, file=sys.stderr)
        dropped_note = f" ({dropped} dropped: no target token left after truncation)" if dropped else ""
        packed = " (packed into rows where lengths differ)" if self.cfg.packing and hasattr(self.task, "pack") else ""
        trainable, total, steps = self.trainable, self.total, self.total_steps
        print(f"base {built.loaded.source}: {total / 1e6:.1f}M params, {cfg.quant} linears in {base_mib:,.1f} MiB"
              f"{kinds}; {what}adapters on {len(built.targets)} layers, {trainable:,} trainable "
              f"({100 * trainable / total:.2f}%); {self.examples} examples{dropped_note}{packed}; "
              f"{steps} step{'s' if steps != 1 else ''} on {self.device.type}"
              f"{procs}{'; gradient checkpointing' if built.checkpointing else ''}"
              f"{'; the 4-bit products in bf16 (this CPU has bf16 matrix units)' if built.bf16_products else ''}",
              file=sys.stderr)

    # ---- the steps -----------------------------------------------------------------------------------------
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
        self.folder.record({"step": step, **metrics})
        return metrics

    def _diverged(self, step: int, what: str) -> QloraError:
        folder = self.folder.checkpoint
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

    def _collate(self, examples: list) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors: its examples right-padded, or with --packing packed into as few rows as hold
        them (the same examples, the same loss: no padding computed)."""
        return self.task.collate(self.task.pack(examples) if self.cfg.packing and hasattr(self.task, "pack")
                                 else examples)

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
                checkpoint.save(self.folder.checkpoint, self.model, optimizer_state, self.scheduler,
                                {"step": step, "order": order.state(), **self.identity}, rng)
        self.last_checkpoint = step

    def train(self, on_step: Callable[[dict], None] | None = None) -> TrainResult:
        cfg, model = self.cfg, self.model
        train_set, eval_set, order, step, total_steps = (self.train_set, self.eval_set, self.order, self.step,
                                                         self.total_steps)
        first_eval = self._eval(eval_set, 0) if step == 0 else None
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None if self.d.main else True,
                   dynamic_ncols=True)
        step_time, tokens, loss, last_eval = 0.0, 0, float("nan"), first_eval
        try:
            while step < total_steps:
                # every rank walks the global order and takes its slice of each global micro-batch
                b, r = cfg.batch_size, self.d.rank
                batches = [self._collate([train_set[i] for i in order.take(b * self.d.world)[r * b:(r + 1) * b]])
                           for _ in range(cfg.grad_accum)]
                t0 = time.perf_counter()
                loss, norm, n = self._step(batches, step + 1)
                step, tokens, step_time = step + 1, tokens + n, step_time + time.perf_counter() - t0
                tps = tokens / step_time  # training throughput: evals and checkpoints not counted
                record = {"step": step, "loss": loss, "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                          "tokens": tokens, "tokens_per_s": tps}
                self.folder.record(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                bar.update(1)
                if bar.disable and self.d.main and (step % cfg.log_every == 0 or step == total_steps):
                    print(f"step {step}/{total_steps}  loss {loss:.4f}  {tps:.0f} tok/s", file=sys.stderr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    last_eval = self._eval(eval_set, step)
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
                    self._checkpoint(step, order)  # and at the end: a finished run can always be extended
                if on_step:
                    on_step(record)
        except KeyboardInterrupt:
            bar.close()
            then = (f"last checkpoint: step {self.last_checkpoint}; continue with --resume" if self.last_checkpoint
                    else "no checkpoint yet: run the same command again to start over")
            if self.d.main:
                print(f"\ninterrupted at step {step}; {then}", file=sys.stderr)
            raise
        bar.close()
        last_eval = self._eval(eval_set, step) if eval_set else last_eval
        adapter = self.folder.adapter
        with distributed.gathered(self.root):
            if self.d.main:
                save_adapter(model, adapter, self.lcfg, self.qcfg, self.built.loaded.source,
                             self.built.loaded.fingerprint, self.built.residual,
                             labels=getattr(self.task, "labels", None))
        distributed.barrier(self.d)  # the adapter is written before any rank returns
        result = TrainResult(adapter, step, loss, last_eval and last_eval["eval_loss"], last_eval,
                             tokens / step_time if step_time >= MIN_TIMED_S else 0.0, peak_memory(self.device),
                             self.trainable, self.total)
        if self.d.main:
            print(_summary(result, first_eval, self.task), file=sys.stderr)
        return result


class TaskLoss(torch.nn.Module):
    """The model and its task as one module: what DDP wraps and FSDP shards from, so that every forward (and
    so every gradient hook, every gathering of sharded weights) goes through it.
    `self("loss", batch, n_units)` or `self("evaluate", examples, batch_size, device)`."""

    def __init__(self, model: torch.nn.Module, task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, what: str, *args):
        return getattr(self.task, what)(self.model, *args)


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

