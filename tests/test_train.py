import json
import math

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from qlora_rt.cli import main
from qlora_rt.config import TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.train.run import train


def config(tiny_llama, tiny_data, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), eval_data=str(tiny_data / "eval.jsonl"),
                out=str(out), rank=4, alpha=8, steps=8, batch_size=2, grad_accum=2, seq_len=64, lr=5e-3,
                eval_every=4, checkpoint_every=3, seed=0)
    return TrainConfig(**{**base, **kw})


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_training_lowers_eval_loss_and_writes_the_run(tiny_llama, tiny_data, tmp_path):
    r = train(config(tiny_llama, tiny_data, tmp_path / "run", steps=12, lr=2e-2))
    assert r.eval_loss is not None and r.steps == 12
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_loss"] for x in records if "eval_loss" in x]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.2
    assert [x["step"] for x in records if "loss" in x] == list(range(1, 13))
    saved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert saved["rank"] == 4 and "resume" not in saved
    keys = adapter(tmp_path / "run")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 14


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tiny_llama, tiny_data, tmp_path):
    train(config(tiny_llama, tiny_data, tmp_path / "full"))

    def interrupt(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_llama, tiny_data, tmp_path / "cut"), on_step=interrupt)
    assert not (tmp_path / "cut" / "adapter").exists() and (tmp_path / "cut" / "checkpoint").exists()
    train(config(tiny_llama, tiny_data, tmp_path / "cut", resume=True))
    records = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9))  # steps 4-5 of the abandoned attempt are not recorded twice
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


def test_blown_up_weights_are_no_good_checkpoint_and_the_folder_restarts(tiny_llama, tiny_data, tmp_path):
    """lr 1e30: the step-1 checkpoint already holds blown-up weights, and the loss they give is not finite.
    Naming it would be a dead end; the run keeps none, and the same command with a lower --lr starts over."""
    run = tmp_path / "run"
    with pytest.raises(QloraError, match=r"step 2: the (loss|gradient norm) is not finite; .*no good checkpoint is "
                                         r"kept; run the same command with a lower --lr to start again in place"):
        train(config(tiny_llama, tiny_data, run, lr=1e30, warmup=0, checkpoint_every=1, max_grad_norm=0))
    assert not (run / "checkpoint").exists() and not (run / "checkpoint.prior").exists()
    r = train(config(tiny_llama, tiny_data, run, checkpoint_every=1))  # the same folder, step 0 again
    assert r.steps == 8 and math.isfinite(r.train_loss)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 9))  # nothing of the diverged attempt is left in the record


@pytest.mark.parametrize("nan_at,kept", [(5, 2), (6, 4)])
def test_divergence_keeps_the_last_checkpoint_a_finite_step_came_from(tiny_llama, tiny_data, tmp_path, monkeypatch,
                                                                      nan_at, kept):
    """Checkpoints at steps 2 and 4; a NaN at step 5 comes from the step-4 weights (dropped: step 2 is kept),
    a NaN at step 6 comes after a finite step 5 (step 4 is kept). A resume may lower the learning rate."""
    from qlora_rt.train.tasks import CausalLM

    real, calls = CausalLM.loss, []

    def loss(model, batch, n):  # micro-batches per step: grad_accum = 2
        calls.append(1)
        out = real(model, batch, n)
        return out * float("nan") if (len(calls) + 1) // 2 == nan_at else out

    monkeypatch.setattr(CausalLM, "loss", staticmethod(loss))
    run = tmp_path / "run"
    with pytest.raises(QloraError, match=rf"step {nan_at}: the loss is not finite; .*checkpoint \(step {kept}\)"):
        train(config(tiny_llama, tiny_data, run, checkpoint_every=2, eval_data=None))
    monkeypatch.setattr(CausalLM, "loss", staticmethod(real))
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["progress"]["step"] == kept
    r = train(config(tiny_llama, tiny_data, run, checkpoint_every=2, eval_data=None, lr=1e-3, resume=True))
    assert r.steps == 8 and math.isfinite(r.train_loss)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": kept, "resumed_with": {"lr": [5e-3, 1e-3]}} in records
    assert yaml.safe_load((run / "run.yaml").read_text())["lr"] == 1e-3


def test_a_finished_run_can_be_extended_and_equals_the_longer_run(tiny_llama, tiny_data, tmp_path):
    """A run shorter than --checkpoint-every still ends with a checkpoint; --resume with more --steps
    continues it (the data order goes on, the schedule is recomputed for the new length): with a constant
    schedule and no warm-up, the extended run is the longer run from the start."""
    kw = dict(schedule="constant", warmup=0, checkpoint_every=50, eval_every=0)
    train(config(tiny_llama, tiny_data, tmp_path / "long", steps=6, **kw))
    train(config(tiny_llama, tiny_data, tmp_path / "ext", steps=4, **kw))
    assert (tmp_path / "ext" / "checkpoint").exists()
    with pytest.raises(QloraError, match=r"is complete \(4 steps\); pass a larger --steps"):
        train(config(tiny_llama, tiny_data, tmp_path / "ext", steps=4, resume=True, **kw))
    with pytest.raises(QloraError, match="can be extended, not shortened"):
        train(config(tiny_llama, tiny_data, tmp_path / "ext", steps=3, resume=True, **kw))
    with pytest.raises(QloraError, match=r"settings differ .*schedule"):
        train(config(tiny_llama, tiny_data, tmp_path / "ext", steps=6, resume=True, **{**kw, "schedule": "cosine"}))
    r = train(config(tiny_llama, tiny_data, tmp_path / "ext", steps=6, resume=True, **kw))
    assert r.steps == 6
    records = [json.loads(x) for x in (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(1, 7))
    assert {"step": 4, "resumed_with": {"steps": [4, 6]}} in records
    assert yaml.safe_load((tmp_path / "ext" / "run.yaml").read_text())["steps"] == 6
    longer, extended = adapter(tmp_path / "long"), adapter(tmp_path / "ext")
    assert max((longer[k] - extended[k]).abs().max().item() for k in longer) <= 1e-6


def test_run_folder_is_never_overwritten_and_resume_needs_a_run(tiny_llama, tiny_data, tmp_path):
    cfg = config(tiny_llama, tiny_data, tmp_path / "run", steps=4, checkpoint_every=2)
    train(cfg)
    with pytest.raises(QloraError, match="already holds a run; pass --resume"):
        train(cfg)
    with pytest.raises(QloraError, match="--resume: .*run.yaml not found"):
        train(config(tiny_llama, tiny_data, tmp_path / "new", resume=True))
    with pytest.raises(QloraError, match=r"settings differ .*rank \(4 -> 8\).*only --lr, --warmup"):
        train(config(tiny_llama, tiny_data, tmp_path / "run", steps=4, rank=8, resume=True))
    done = config(tiny_llama, tiny_data, tmp_path / "done", steps=2, checkpoint_every=0)
    train(done)  # finished, no checkpoint: nothing to resume, and nothing to suggest resuming
    with pytest.raises(QloraError, match="already holds a run; choose another folder"):
        train(done)
    with pytest.raises(QloraError, match="holds a finished run with no checkpoint to continue from"):
        train(config(tiny_llama, tiny_data, tmp_path / "done", steps=2, checkpoint_every=0, resume=True))


def test_messages_without_assistant_and_empty_data(tiny_llama, tiny_data, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(QloraError, match=r"bad.jsonl:2: 'messages' has no assistant turn"):
        train(config(tiny_llama, tiny_data, tmp_path / "r1", data=str(bad)))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QloraError, match="empty.jsonl: no examples"):
        train(config(tiny_llama, tiny_data, tmp_path / "r2", data=str(tmp_path / "empty.jsonl")))


def test_cli_prints_one_line_errors_and_reads_yaml_config(tiny_llama, tiny_data, tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "missing"), "--data", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-rt train: error: --model:") and "\n" not in err and "does not exist" in err

    cfg = config(tiny_llama, tiny_data, tmp_path / "run", steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg.saved(), "rank": 2}))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--rank", "3"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["rank"] == 3
    assert main(["merge", "--model", str(tiny_llama), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()
    (tmp_path / "typo.yaml").write_text("rnak: 3\n")
    assert main(["train", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown field(s) rnak" in capsys.readouterr().err


def test_epochs_decide_steps(tiny_llama, tiny_data, tmp_path):
    r = train(config(tiny_llama, tiny_data, tmp_path / "run", steps=None, epochs=0.5, eval_data=None))
    n = len((tiny_data / "train.jsonl").read_text().splitlines())
    assert r.steps == math.ceil(0.5 * n / 4) and r.eval_loss is None


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_place(tiny_llama, tiny_data, tmp_path, capsys):
    def interrupt(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    cfg = config(tiny_llama, tiny_data, tmp_path / "run", checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    assert "no checkpoint yet: run the same command again to start over" in capsys.readouterr().err
    for resume in (True, False):  # either way: nothing to keep, so step 0 in the same folder
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_llama, tiny_data, tmp_path / "run", checkpoint_every=5, resume=resume), on_step=interrupt)
        assert "stopped before its first checkpoint; starting it again from step 0" in capsys.readouterr().err
    (tmp_path / "run" / "run.yaml").write_text("")  # a full disk once left a 0-byte run.yaml
    assert train(cfg).steps == 8
    full = adapter(tmp_path / "run")
    train(config(tiny_llama, tiny_data, tmp_path / "clean", checkpoint_every=5))
    assert all(torch.equal(full[k], v) for k, v in adapter(tmp_path / "clean").items())


def test_resume_trusts_the_checkpoint_not_a_damaged_run_yaml(tiny_llama, tiny_data, tmp_path):
    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_llama, tiny_data, tmp_path / "cut"), on_step=interrupt)
    (tmp_path / "cut" / "run.yaml").write_text("")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a record cut short by a kill
    train(config(tiny_llama, tiny_data, tmp_path / "cut", resume=True))
    train(config(tiny_llama, tiny_data, tmp_path / "full"))
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    assert yaml.safe_load((tmp_path / "cut" / "run.yaml").read_text()) is None  # left alone: nothing changed


def test_resume_after_the_data_changed_says_what_changed(tiny_llama, tiny_data, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text((tiny_data / "train.jsonl").read_text())

    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_llama, tiny_data, tmp_path / "run", data=str(data)), on_step=interrupt)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(QloraError, match=r"--resume: --data .* changed since the run started \([\d,]+ -> [\d,]+ bytes, "
                                         r"72 -> 10 examples\)"):
        train(config(tiny_llama, tiny_data, tmp_path / "run", data=str(data), resume=True))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_llama, tiny_data, tmp_path, monkeypatch):
    import errno

    import qlora_rt.train.checkpoint as ck

    real, saves = ck.save_file, []

    def fill_up(tensors, path, **kw):
        saves.append(path)
        if len(saves) == 2:  # the step-6 checkpoint: the disk is full
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(ck, "save_file", fill_up)
    run = tmp_path / "run"
    with pytest.raises(QloraError, match=r"could not write .*checkpoint: the disk is full \(.* MiB free .*\); the "
                                         "previous version is untouched"):
        train(config(tiny_llama, tiny_data, run))
    monkeypatch.setattr(ck, "save_file", real)
    assert ck.progress(run / "checkpoint")["step"] == 3 and (run / "checkpoint").is_dir()
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "metrics.jsonl", "run.yaml"]  # no temp
    train(config(tiny_llama, tiny_data, run, resume=True))  # space again: the run goes on from step 3
    train(config(tiny_llama, tiny_data, tmp_path / "full"))
    full, resumed = adapter(tmp_path / "full"), adapter(run)
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


KILLED = """
import json, os, signal, sys
import qlora_rt.train.checkpoint as ck
from qlora_rt.config import TrainConfig
from qlora_rt.train.run import train

step, where, cfg = int(sys.argv[1]), sys.argv[2], TrainConfig(**json.loads(sys.argv[3]))
saving, save, real_replace = [0], ck.save, os.replace


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counting(folder, model, optimizer, scheduler, progress, rng=None):  # which step's checkpoint is being written
    saving[0] = progress["step"]
    save(folder, model, optimizer, scheduler, progress, rng)


def dying(real):
    def hook(*args, **kw):
        if saving[0] == step:
            if real is ck.save_file:
                real(*args, **kw)  # the adapter file is written, the optimizer state is not
            die()
        return real(*args, **kw)
    return hook


def replace(src, dst):  # dies between moving the last checkpoint aside and renaming the new one in
    real_replace(src, dst)
    if saving[0] == step and str(dst).endswith("checkpoint.prior"):
        die()


ck.save = counting
if where == "after the step":
    train(cfg, on_step=lambda r: r["step"] == step and die())
elif where == "inside the save":
    ck.save_file = dying(ck.save_file)
elif where == "before the rename":
    ck.write_json = dying(ck.write_json)
else:
    os.replace = replace
train(cfg)
"""


def _cases(n: int = 4, seed: int = 14):
    import random

    rng = random.Random(seed)  # random, yet the same cases on every run
    wheres = ["after the step", "inside the save", "before the rename", "while replacing the last"]
    steps = {"after the step": [2, 4, 6, 7], "while replacing the last": [4, 6]}  # step 2 replaces nothing
    return [(rng.choice(steps.get(w, [2, 4, 6])), w) for w in rng.sample(wheres, n)]


@pytest.mark.parametrize("step,where", _cases())
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_adapter(tiny_llama, tiny_data, tmp_path,
                                                                             step, where):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cut = config(tiny_llama, tiny_data, tmp_path / "cut", checkpoint_every=2)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(step), where, json.dumps(vars(cut))], cwd=repo,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL: no handler ran
    assert not (tmp_path / "cut" / "adapter").exists()
    train(config(tiny_llama, tiny_data, tmp_path / "cut", checkpoint_every=2, resume=True))
    train(config(tiny_llama, tiny_data, tmp_path / "full", checkpoint_every=2))
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


def test_out_holding_someone_elses_files_is_refused_untouched(tiny_llama, tiny_data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter").mkdir()  # a folder the final adapter save would replace
    (tmp_path / "mine" / "notes.md").write_text("keep")
    with pytest.raises(QloraError, match=r"holds files that are not a run's \(notes.md\); choose a new or empty"):
        train(config(tiny_llama, tiny_data, tmp_path / "mine"))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["adapter", "notes.md"]


def test_gradient_checkpointing_changes_memory_not_the_adapter(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    import qlora_rt.train.run as tr

    train(config(tiny_llama, tiny_data, tmp_path / "plain", steps=4, checkpoint_every=0))
    assert "gradient checkpointing" not in capsys.readouterr().err  # a small base: off by default
    monkeypatch.setattr(tr, "GRAD_CHECKPOINTING_FROM", 1)  # as a 1B+ base: on by default
    train(config(tiny_llama, tiny_data, tmp_path / "auto", steps=4, checkpoint_every=0))
    assert "gradient checkpointing" in capsys.readouterr().err
    train(config(tiny_llama, tiny_data, tmp_path / "off", steps=4, checkpoint_every=0, grad_checkpointing=False))
    assert "gradient checkpointing" not in capsys.readouterr().err
    plain, recomputed = adapter(tmp_path / "plain"), adapter(tmp_path / "auto")  # dropout's RNG is replayed
    assert max((plain[k] - recomputed[k]).abs().max().item() for k in plain) <= 1e-6
    off = adapter(tmp_path / "off")
    assert all(torch.equal(plain[k], off[k]) for k in plain)


def test_output_is_quiet_and_exact(tiny_llama, tiny_data, tmp_path, capsys, monkeypatch):
    """The --quant auto note comes with a run that starts, not before an error; a run too short to time shows
    no tokens/s; one step is "1 step". (bitsandbytes' hub-kernel notice: tests/test_quant.py.) "Too short"
    is set far away: a busy machine can spend the real bound (1 s) on one tiny step."""
    import qlora_rt.train.run as run

    monkeypatch.setattr(run, "MIN_TIMED_S", 1e9)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QloraError, match="no examples"):
        train(config(tiny_llama, tiny_data, tmp_path / "bad", data=str(tmp_path / "empty.jsonl"), quant="auto"))
    assert "--quant auto" not in capsys.readouterr().err
    r = train(config(tiny_llama, tiny_data, tmp_path / "one", steps=1, quant="auto", checkpoint_every=0,
                     eval_data=None))
    err = capsys.readouterr().err
    assert "--quant auto: int4 base" in err and " 1 step on " in err
    assert r.tokens_per_s == 0 and "- (too short to time)" in err


def test_bf16_products_on_a_cpu_with_bf16_units_and_not_with_dtype_float32(tiny_llama, tiny_data, tmp_path,
                                                                            monkeypatch, capsys):
    import qlora_rt.train.run as run

    monkeypatch.setattr(run, "bf16_matrix_units", lambda: True)  # as on an AMX / AVX512-BF16 CPU
    fast = train(config(tiny_llama, tiny_data, tmp_path / "auto", steps=4, lr=2e-2))
    assert "the 4-bit products in bf16" in capsys.readouterr().err
    exact = train(config(tiny_llama, tiny_data, tmp_path / "fp32", steps=4, lr=2e-2, dtype="float32"))
    assert "products in bf16" not in capsys.readouterr().err
    # the same run but for the products' rounding: the losses agree to bf16's precision
    assert math.isclose(fast.train_loss, exact.train_loss, rel_tol=0.05)
    monkeypatch.setattr(run, "bf16_matrix_units", lambda: False)
    train(config(tiny_llama, tiny_data, tmp_path / "plain", steps=1))
    assert "products in bf16" not in capsys.readouterr().err


@pytest.mark.parametrize("quant", ["int4", "nf4"])
def test_bf16_products_move_a_run_by_bf16_rounding_whatever_the_batch_shape(tiny_llama, tiny_data, tmp_path,
                                                                              monkeypatch, quant):
    """What `--dtype auto`'s bf16 products change, bounded by bf16's precision, on any CPU. A bf16 product
    rounds both operands to an 8-bit significand (relative error <= 2**-9 each, <= 2**-8 in every term, summed
    in fp32); each step's loss and gradient norm and the eval loss are smooth functions of those products, so
    they move from the fp32 products' run, and one batch shape's (1 x 4) from another's (2 x 2 accumulated), by
    at most that relative amount, however the CPU's kernels block a product of 4 rows or 2. The adapters
    themselves are not compared element by element: Adam's first steps move every weight by about lr whatever
    its gradient's size, so a rounding difference in a near-zero gradient can move a weight by up to 2 lr a step
    (nf4 on a 2-core AMD EPYC, 2026-12-07: 7.6e-4 between the two batch shapes at lr 1e-3, 1e-7 with fp32
    products; an Intel Xeon rounds otherwise). The equality tests across batch shapes and processes therefore
    train with --dtype float32 (tests/test_distributed.py)."""
    import qlora_rt.train.run as run

    monkeypatch.setattr(run, "bf16_matrix_units", lambda: True)  # bf16 products on any CPU (slower without units)
    kw = dict(quant=quant, steps=4, lr=1e-3, dropout=0.0, eval_every=0, checkpoint_every=0)
    runs = {name: train(config(tiny_llama, tiny_data, tmp_path / name, **kw, **more)).adapter.parent
            for name, more in (("bf16x4", dict(batch_size=4, grad_accum=1)), ("bf16x2x2", {}),
                               ("fp32x4", dict(batch_size=4, grad_accum=1, dtype="float32")))}

    def steps(name):
        return [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]

    ref = steps("bf16x4")
    for other in ("bf16x2x2", "fp32x4"):
        for a, b in zip(ref, steps(other), strict=True):
            for key in {"loss", "grad_norm", "eval_loss"} & a.keys():
                assert abs(a[key] - b[key]) <= 2**-8 * abs(b[key]), (other, key, a, b)


def _flip(path, where: float = 0.5, n: int = 64, low_byte_only: bool = False) -> None:
    """Change bytes of a file in place: n bytes from `where` of its length, or only the lowest byte of n fp32
    values there (a change no reader notices)."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * where) // 4 * 4
    for i in range(n):
        k = at + 4 * i if low_byte_only else at + i
        data[k] ^= 0x01 if low_byte_only else 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("low_byte_only", [False, True])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(tiny_llama, tiny_data, tmp_path, capsys,
                                                                    low_byte_only):
    """Checkpoints at steps 3, 6 and 8 (the run's end), the last two kept. Bytes changed in the newest's adapter
    file (a bad disk, a partial copy): the resume continues from step 6, says so in one line, and trains on
    sane weights; with the prior one damaged too, it is refused, naming the file."""
    kw = dict(eval_data=None, schedule="constant", warmup=0)
    run = tmp_path / "run"
    train(config(tiny_llama, tiny_data, run, **kw))
    assert (run / "checkpoint" / "digests.json").is_file() and (run / "checkpoint.prior").is_dir()
    _flip(run / "checkpoint" / "adapter_model.safetensors", low_byte_only=low_byte_only)
    capsys.readouterr()
    r = train(config(tiny_llama, tiny_data, run, steps=10, resume=True, **kw))
    err = capsys.readouterr().err
    assert "adapter_model.safetensors does not match its digest" in err
    assert "continuing from the checkpoint before it, at step 6" in err
    assert r.steps == 10 and math.isfinite(r.train_loss)
    assert max(t.abs().max().item() for t in adapter(run).values()) < 1.0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 11))  # steps 7-8 of the damaged checkpoint's run are not recorded twice
    _flip(run / "checkpoint" / "trainer_state.pt")
    _flip(run / "checkpoint.prior" / "adapter_model.safetensors")
    with pytest.raises(QloraError, match=r"no whole checkpoint in .*checkpoint: .*trainer_state\.pt does not match "
                                         r"its digest"):
        train(config(tiny_llama, tiny_data, run, steps=12, resume=True, **kw))


def test_a_run_folder_has_one_writer_and_a_dead_ones_lock_does_not_block(tiny_llama, tiny_data, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    train(config(tiny_llama, tiny_data, run, steps=4, eval_data=None))
    script = ("import sys, time\nfrom qlora_rt.train.run_folder import RunFolder\nfolder = RunFolder(sys.argv[1])\n"
              "folder.lock()\nprint('locked', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QloraError, match=rf"--out: .*run is in use by another training run \(process "
                                             rf"{holder.pid}\); wait for it to end"):
            train(config(tiny_llama, tiny_data, run, steps=6, eval_data=None, resume=True))
    finally:
        holder.kill()
        holder.wait()
    r = train(config(tiny_llama, tiny_data, run, steps=6, eval_data=None, resume=True))  # its lock went with it
    assert r.steps == 6


def test_a_resume_without_its_metrics_file_says_what_is_lost(tiny_llama, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(tiny_llama, tiny_data, run, steps=4, eval_data=None))
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    train(config(tiny_llama, tiny_data, run, steps=6, eval_data=None, resume=True))
    assert "metrics.jsonl is gone: the records of steps 1-4 are lost" in capsys.readouterr().err
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == [5, 6]


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_loss_in_chunks_of_positions_equals_the_loss_in_one(monkeypatch, head_trains):
    """token_losses in chunks of 7 positions against one product over all 50: a frozen head (QLoRA's) takes each
    chunk's forward and backward at once; a trained one recomputes each chunk in backward. The loss and the
    gradients (of the hidden states; of a trained head) equal within fp32 summation order."""
    from conftest import make_model

    from qlora_rt.train import tasks

    model = make_model(vocab=320)
    model.lm_head.weight.requires_grad_(head_trains)
    torch.manual_seed(0)
    hidden = torch.randn(50, 64)
    targets = torch.randint(0, 320, (50,))
    results = []
    for chunk in (1 << 30, 7 * 320):
        monkeypatch.setattr(tasks, "LOSS_CHUNK", chunk)
        model.zero_grad()
        h = hidden.clone().requires_grad_(True)
        loss = tasks.token_losses(model, h, targets) * 0.5  # an outer factor reaches the chunks' gradients
        loss.backward()
        results.append((loss.detach(), h.grad, model.lm_head.weight.grad))
    (l1, g1, w1), (l2, g2, w2) = results
    assert torch.allclose(l1, l2, rtol=1e-6, atol=0)
    with torch.no_grad():  # evaluation takes the chunks' losses alone
        assert torch.allclose(tasks.token_losses(model, hidden, targets) * 0.5, l1, rtol=1e-6, atol=0)
    assert (g1 - g2).abs().max() < 1e-5 * g1.abs().max()
    if head_trains:
        assert (w1 - w2).abs().max() < 1e-5 * w1.abs().max()
    else:
        assert w1 is None and w2 is None


def test_pack_fills_rows_best_fit_and_keeps_each_example_whole():
    from qlora_rt.train.text_data import IGNORE, Example, pack

    examples = [Example(list(range(10 * k, 10 * k + n)), list(range(10 * k, 10 * k + n))) for k, n in
                enumerate([5, 8, 3, 7, 2, 5])]
    rows = pack(examples, capacity=10)
    assert sorted(len(r.input_ids) for r in rows) == [10, 10, 10]  # 30 tokens in three full rows
    for r in rows:  # each member whole, its own positions from 0, its first token without a label
        starts = [i for i, p in enumerate(r.positions) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(r.positions)]):
            member = next(x for x in examples if x.input_ids == r.input_ids[s:e])
            assert r.positions[s:e] == list(range(e - s))
            assert r.labels[s:e] == [IGNORE] + member.labels[1:]
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for x in examples for t in x.input_ids)
    assert [r.input_ids for r in pack(examples, 10)] == [r.input_ids for r in rows], "the same data packs the same"


def test_a_packed_step_equals_the_padded_step_on_the_same_examples(tiny_llama, tiny_data, tmp_path):
    """The same 8 examples (the 4 shortest, the 4 longest) as a right-padded batch and packed into rows of 64: the
    loss and every adapter gradient agree to fp32 summation order (the products' shapes differ, so their rounding
    does: 1e-5 of the loss, 1e-4 of each gradient's largest entry), and the packed rows hold fewer slots."""
    from qlora_rt.lora.svd_init import InitConfig
    from qlora_rt.train import distributed
    from qlora_rt.train.run import Trainer, _device_and_dtype, _resolved

    cfg = _resolved(config(tiny_llama, tiny_data, tmp_path / "run", dropout=0.0, dtype="float32"))
    device, dtype = _device_and_dtype(cfg)
    t = Trainer(cfg, InitConfig(cfg.init, cfg.loftq_iters, cfg.svd), device, dtype,
                distributed.setup(device, cfg.dist_timeout))
    t.setup()
    for p in t.params:  # B starts at zero: a random adapter, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    by_length = sorted(t.train_set, key=lambda e: len(e.input_ids))
    examples = by_length[:4] + by_length[-4:]  # short and long: the padded batch is mostly padding

    def step(batch):
        t.model.zero_grad(set_to_none=True)
        loss = t.task.loss(t.model, batch, t.task.units(batch))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in t.params]

    padded = t.task.collate(examples)
    packed = t.task.collate(t.task.pack(examples))
    assert t.task.units(packed) == t.task.units(padded)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    (l1, g1), (l2, g2) = step(padded), step(packed)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=0), (l1, l2)
    for a, b in zip(g1, g2):
        assert a.abs().max() > 0 and (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_packing_trains_resumes_and_packs_only_where_lengths_differ(tiny_llama, tiny_data, tmp_path, capsys):
    from qlora_rt.train.tasks import CausalLM
    from qlora_rt.train.text_data import Example

    run = tmp_path / "run"
    train(config(tiny_llama, tiny_data, run, steps=4, eval_data=None))  # on by default
    assert "72 examples (packed into rows where lengths differ)" in capsys.readouterr().err
    result = train(config(tiny_llama, tiny_data, run, steps=6, eval_data=None, resume=True))
    assert result.steps == 6 and math.isfinite(result.train_loss)
    task = CausalLM(__import__("types").SimpleNamespace(pad_token_id=0), seq_len=64)
    alike = [Example([1] * n, [1] * n) for n in (30, 31, 29, 30)]
    assert task.pack(alike) is alike, "examples of like length stay padded: packing them saves nothing"
    mixed = [Example([1] * n, [1] * n) for n in (60, 5, 6, 40)]
    rows = task.pack(mixed)
    assert len(rows) * max(len(r.input_ids) for r in rows) <= 0.875 * 4 * 60 and all(r.positions for r in rows)
