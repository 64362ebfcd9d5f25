"""QLoRA training: a frozen 4-bit base, fp32 LoRA adapters, and a loop that can stop and resume exactly."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from qlora_rt import checkpoint
from qlora_rt.adapters import save_adapter
from qlora_rt.data import IGNORE, Order, collate, count_targets, load_examples, steps_for_epochs
from qlora_rt.errors import QloraError
from qlora_rt.load import load
from qlora_rt.lora import (LoraConfig, add_adapters, count_parameters, linear_names, lora_layers, quantize_model,
                           select_targets, trainable_parameters)
from qlora_rt.svdinit import RESIDUAL, InitConfig, Plan, load_residual, save_residual
from qlora_rt.config import TrainConfig
from qlora_rt.quant import QuantConfig, storage_bytes
from qlora_rt.report import peak_memory, table


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    peak_memory: str
    trainable: int
    total: int


def _device_and_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise QloraError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device if cfg.device != "auto" else "cpu")
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, cfg.dtype)


def _check_run_folder(cfg: TrainConfig) -> None:
    saved_path = Path(cfg.out) / "run.yaml"
    if not cfg.resume:
        if saved_path.exists():
            raise QloraError(f"--out: {cfg.out} already holds a run; pass --resume to continue it or choose another folder")
        return
    if not saved_path.exists():
        raise QloraError(f"--resume: {saved_path} not found; there is no run to continue in {cfg.out}")
    saved = yaml.safe_load(saved_path.read_text())
    diff = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in cfg.saved().items() if saved.get(k) != v]
    if diff:
        raise QloraError(f"--resume: settings differ from {saved_path}: {', '.join(diff)}")


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    if cfg.optim == "paged_adamw_8bit":
        if device.type != "cuda":
            raise QloraError("--optim paged_adamw_8bit needs CUDA; use --optim adamw on the CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_targets: int) -> torch.Tensor:
    """Sum of token cross-entropies / n_targets, with the output head applied only where a label is.

    The head of a small model is a large share of its compute (SmolLM2-135M: 49k x 576), and in chat
    data most positions carry no loss; skipping them makes a training step ~17% faster, same loss.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, d)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (N, vocab)
    return F.cross_entropy(logits, labels[keep], reduction="sum") / n_targets


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean token loss over the examples (exp of it is the perplexity)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        n = count_targets(batch)
        total += causal_lm_loss(model, batch, n).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data`; write the adapter to `cfg.out/adapter`."""
    cfg.check()
    icfg = InitConfig(cfg.init, cfg.loftq_iters, cfg.svd)  # a bad --init fails before the model loads
    _check_run_folder(cfg)
    device, dtype = _device_and_dtype(cfg)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    loaded = load(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    qcfg = QuantConfig(cfg.quant, cfg.double_quant, cfg.block_size, dtype, cfg.symmetric, cfg.int4_compute)
    lcfg = LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.targets)
    plan = None
    if icfg.method != "default" and not cfg.resume:
        names = set(select_targets(linear_names(model), cfg.targets))
        plan = Plan(icfg, qcfg, cfg.rank, lcfg.scale(), names, device)
    quantize_model(model, qcfg, device, loaded.gguf, plan)
    targets = add_adapters(model, lcfg)
    residual = out / RESIDUAL if icfg.method != "default" else None
    if plan:
        plan.apply(model)
        print(plan.summary(), file=sys.stderr)
    elif residual:  # resuming: the run's own residual base, not a recomputed one
        load_residual(model, residual, qcfg, device, fingerprint=loaded.fingerprint)
    train_set, dropped = load_examples(cfg.data, tok, cfg.seq_len)
    eval_set = load_examples(cfg.eval_data, tok, cfg.seq_len)[0] if cfg.eval_data else []
    total_steps = cfg.steps or steps_for_epochs(cfg.epochs or 1.0, len(train_set), cfg.batch_size, cfg.grad_accum)
    params = trainable_parameters(model)
    optimizer = _optimizer(cfg, params, device)
    from transformers import get_cosine_schedule_with_warmup

    warmup = int(cfg.warmup) if cfg.warmup >= 1 else math.ceil(cfg.warmup * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    step, order = 0, Order(len(train_set), cfg.seed)
    if cfg.resume:
        progress = checkpoint.load(out / "checkpoint", model, optimizer, scheduler)
        step, order = progress["step"], Order(len(train_set), cfg.seed, **progress["order"])
        _drop_metrics_after(out / "metrics.jsonl", step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if residual:  # before run.yaml: a run that can be resumed always has its base
            save_residual(model, targets, residual, {"base.fingerprint": loaded.fingerprint, "init": icfg.describe(),
                                                     "init.method": icfg.method, **qcfg.as_metadata()})
        (out / "run.yaml").write_text(yaml.safe_dump(cfg.saved(), sort_keys=False))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    base_mib = sum(storage_bytes(m.weight) for m in lora_layers(model).values()) / 2**20
    print(f"base {loaded.source}: {total / 1e6:.1f}M params, {cfg.quant} linears in {base_mib:,.1f} MiB; adapters on "
          f"{len(targets)} layers, {trainable:,} trainable ({100 * trainable / total:.2f}%); "
          f"{len(train_set)} examples{f' ({dropped} dropped: no target token left after truncation)' if dropped else ''}; "
          f"{total_steps} steps on {device.type}", file=sys.stderr)
    loop = _Loop(cfg, model, optimizer, scheduler, params, device, tok.pad_token_id, out, on_step, residual)
    loop.last_checkpoint = step if cfg.resume else None
    return loop.run(train_set, eval_set, order, step, total_steps, loaded, qcfg, lcfg, trainable, total)


def _drop_metrics_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget their first, abandoned records."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


class _Loop:
    """The optimizer-step loop; split from `train` only so each piece reads on one screen."""

    def __init__(self, cfg, model, optimizer, scheduler, params, device, pad_id, out, on_step, residual) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.params, self.device, self.pad_id, self.out, self.on_step = params, device, pad_id, out, on_step
        self.residual = residual  # PiSSA/LoftQ: the run's frozen residual base, shipped with the adapter
        self.last_checkpoint: int | None = None

    def _write(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _eval(self, eval_set: list, step: int) -> float | None:
        if not eval_set:
            return None
        loss = evaluate(self.model, eval_set, self.cfg.batch_size, self.pad_id, self.device)
        self._write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})
        return loss

    def _diverged(self, step: int, what: str) -> QloraError:
        kept = (f"the last good checkpoint (step {self.last_checkpoint}) is in {self.out / 'checkpoint'}; "
                "continue from it with --resume, or start again with a lower --lr"
                if self.last_checkpoint is not None else "no checkpoint was written yet; start again with a lower --lr")
        return QloraError(f"step {step}: {what} is not finite; training stopped and {kept}")

    def _step(self, batches: list[dict], step: int) -> tuple[float, float, int]:
        """One optimizer step over the micro-batches: (loss, grad norm, tokens)."""
        n_targets = sum(count_targets(b) for b in batches)
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # sum of token losses / tokens in the whole step: accumulation weighs every token equally
            loss = causal_lm_loss(self.model, batch, n_targets)
            loss.backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(loss_sum):
            raise self._diverged(step, "the loss")
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            raise self._diverged(step, "the gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, float(norm), tokens

    def run(self, train_set, eval_set, order, step, total_steps, loaded, qcfg, lcfg, trainable, total) -> TrainResult:
        cfg, model = self.cfg, self.model
        first_eval = self._eval(eval_set, 0) if step == 0 else None
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None, dynamic_ncols=True)
        step_time, tokens, loss, eval_loss = 0.0, 0, float("nan"), first_eval
        try:
            while step < total_steps:
                batches = [collate([train_set[i] for i in order.take(cfg.batch_size)], self.pad_id)
                           for _ in range(cfg.grad_accum)]
                t0 = time.perf_counter()
                loss, norm, n = self._step(batches, step + 1)
                step, tokens, step_time = step + 1, tokens + n, step_time + time.perf_counter() - t0
                tps = tokens / step_time  # training throughput: evals and checkpoints not counted
                record = {"step": step, "loss": loss, "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                          "tokens": tokens, "tokens_per_s": tps}
                self._write(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                bar.update(1)
                if bar.disable and (step % cfg.log_every == 0 or step == total_steps):
                    print(f"step {step}/{total_steps}  loss {loss:.4f}  {tps:.0f} tok/s", file=sys.stderr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    eval_loss = self._eval(eval_set, step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    checkpoint.save(self.out / "checkpoint", model, self.optimizer, self.scheduler,
                                    {"step": step, "order": order.state()})
                    self.last_checkpoint = step
                if self.on_step:
                    self.on_step(record)
        except KeyboardInterrupt:
            bar.close()
            where = f"step {self.last_checkpoint}" if self.last_checkpoint else "none yet"
            print(f"\ninterrupted at step {step}; last checkpoint: {where}; continue with --resume", file=sys.stderr)
            raise
        bar.close()
        eval_loss = self._eval(eval_set, step) if eval_set else eval_loss
        adapter = save_adapter(model, self.out / "adapter", lcfg, qcfg, loaded.source, loaded.fingerprint,
                               self.residual)
        result = TrainResult(adapter, step, loss, eval_loss, tokens / max(step_time, 1e-9),
                             peak_memory(self.device), trainable, total)
        print(_summary(result, first_eval), file=sys.stderr)
        return result


def _summary(r: TrainResult, first_eval: float | None) -> str:
    def ev(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f} (ppl {math.exp(min(x, 50)):.2f})"

    return table("training summary", [
        ("trainable params", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)"),
        ("steps", r.steps), ("final train loss", f"{r.train_loss:.4f}"),
        ("eval loss at start", ev(first_eval)), ("eval loss at end", ev(r.eval_loss)),
        ("tokens/s", f"{r.tokens_per_s:,.0f}"), ("peak memory", r.peak_memory), ("adapter", r.adapter),
    ])

