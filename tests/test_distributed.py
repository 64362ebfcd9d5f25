"""Training on several processes (torch.distributed DDP over gloo, 2 processes on the CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlora_rt.cli import main
from qlora_rt.config import TrainConfig
from qlora_rt.train.run import train

REPO = Path(__file__).resolve().parents[1]


def settings(model, data, out, **kw) -> dict:
    """A short run's settings. fp32 products (`dtype="float32"`): these tests compare runs whose batches have
    other shapes (2 processes x b against 1 x 2b), and `--dtype auto`'s bf16 products round by how the CPU's
    kernels block a product of that many rows, which differs between CPUs (tests/test_train.py bounds what bf16
    products change)."""
    return {**dict(model=str(model), data=str(data), out=str(out), steps=4, lr=1e-3, dropout=0.0, seq_len=64,
                   checkpoint_every=0, eval_every=0, dtype="float32"), **kw}


def flags(model, data, out, **kw) -> list[str]:
    argv = []
    for k, v in settings(model, data, out, **kw).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def tensors(run: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def max_diff(a: Path, b: Path) -> float:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize("quant,batch,accum,fsdp", [("nf4", 2, 1, False), ("int4", 2, 1, False), ("nf4", 1, 2, False),
                                                    ("nf4", 2, 1, True), ("int4", 1, 2, True)])
def test_two_processes_make_the_update_of_one_with_the_global_batch(tiny_llama, tiny_data, tmp_path, quant, batch,
                                                                    accum, fsdp, capfd):
    """2 processes x batch b (x accumulation) = 1 process x batch 2b (x accumulation): each rank takes its
    slice of the global order, the loss is normalised by the global token count, and DDP's all-reduce or
    FSDP's reduce-scatter (through the loss module they wrap) makes the ranks' gradients one."""
    data = str(tiny_data / "train.jsonl")
    train(TrainConfig(**settings(tiny_llama, data, tmp_path / "one", quant=quant, batch_size=2 * batch,
                                 grad_accum=accum)))
    capfd.readouterr()
    assert main(["train", *flags(str(tiny_llama), data, str(tmp_path / "two"), quant=quant, batch_size=batch,
                                 grad_accum=accum), "--nproc", "2", *(["--fsdp"] if fsdp else [])]) == 0
    err = capfd.readouterr().err
    assert f"x 2 processes ({'FSDP' if fsdp else 'DDP'}" in err and f"global batch {2 * batch * accum})" in err
    if fsdp:  # each process holds about half of every weight, the 4-bit bytes included
        assert 45 <= int(re.search(r"FSDP: (\d+)% of the [\d.]+ MiB of weights on each", err).group(1)) <= 55
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-5
    records = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one writer


def _torchrun(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "qlora_rt", "train", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)


@pytest.mark.parametrize("fsdp", [False, True])
def test_kill_9_of_one_rank_then_resume_equals_the_uninterrupted_run(tiny_llama, tiny_data, tmp_path, fsdp):
    """One worker SIGKILLed after the step-10 checkpoint: the whole job stops (torchrun takes the other
    down), the checkpoint is intact, and --resume on 2 processes ends with the uninterrupted run's adapter
    (FSDP: the sharded optimizer state saved whole and sharded again)."""
    more = ["--fsdp"] if fsdp else []
    argv = flags(str(tiny_llama), str(tiny_data / "train.jsonl"), str(tmp_path / "cut"), steps=30,
                 checkpoint_every=10, batch_size=2) + more
    job = _torchrun(argv)
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(l).get("step", 0) >= 12 for l in lines if l.strip()):
            break
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0 and not (tmp_path / "cut" / "adapter").exists(), out[-2000:]
    progress = json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())
    assert progress["step"] in (10, 20) and progress["world_size"] == 2
    assert main(["train", *argv, "--resume", "--nproc", "2"]) == 0
    full = flags(str(tiny_llama), str(tiny_data / "train.jsonl"), str(tmp_path / "full"), steps=30,
                 checkpoint_every=10, batch_size=2) + more
    assert main(["train", *full, "--nproc", "2"]) == 0
    assert max_diff(tmp_path / "cut", tmp_path / "full") <= 1e-6


def test_resume_on_another_number_of_processes_is_refused(tiny_llama, tiny_data, tmp_path, capfd):
    argv = flags(str(tiny_llama), str(tiny_data / "train.jsonl"), str(tmp_path / "run"), steps=6, checkpoint_every=2,
                 batch_size=2)

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**settings(tiny_llama, tiny_data / "train.jsonl", tmp_path / "run", steps=6,
                                     checkpoint_every=2, batch_size=2)), on_step=stop)
    capfd.readouterr()
    assert main(["train", *argv, "--resume", "--nproc", "2"]) != 0
    err = capfd.readouterr().err
    assert "the run was trained on 1 process; resume it with 1" in err
    assert "processes stopped (exit 2)" in err and "Traceback" not in err
    # --fsdp on one process shards nothing: the run goes on unsharded, as it was trained
    assert main(["train", *argv, "--resume", "--fsdp"]) == 0
    assert "one process, nothing to shard" in capfd.readouterr().err


def test_a_non_finite_loss_stops_every_rank_with_one_message(tiny_llama, tiny_data, tmp_path, capfd):
    t0 = time.time()
    argv = flags(str(tiny_llama), str(tiny_data / "train.jsonl"), str(tmp_path / "run"), steps=6, batch_size=2)
    argv[argv.index("--lr") + 1] = "1e30"
    assert main(["train", *argv, "--nproc", "2"]) != 0
    err = capfd.readouterr()
    assert "is not finite; training stopped" in err.out + err.err and time.time() - t0 < 120


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_classifier_trains_on_two_processes_too(sentiment, tmp_path, fsdp):
    """The encoder's loss goes through the same wrapped module: 2 x batch 4 = 1 x batch 8, head included (the
    model's own dropout off: each rank draws its own masks); FSDP evaluates through its root as well."""
    from conftest import save_encoder

    tiny_bert = save_encoder(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = sentiment / "train.jsonl"
    one = settings(tiny_bert, data, tmp_path / "one", batch_size=8, eval_data=str(sentiment / "eval.jsonl"))
    train(TrainConfig(**one))
    two = flags(tiny_bert, data, tmp_path / "two", batch_size=4, eval_data=sentiment / "eval.jsonl")
    assert main(["train", *two, "--nproc", "2", *(["--fsdp"] if fsdp else [])]) == 0
    assert "base_model.model.classifier.weight" in tensors(tmp_path / "two")
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-5
    evals = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["step"] for e in evals] == [0, 4]  # evaluated on every rank, written once


def test_fsdp_refuses_what_it_cannot_shard_and_says_when_there_is_nothing_to(tiny_llama, tiny_data, tmp_path, capfd):
    argv = flags(str(tiny_llama), str(tiny_data / "train.jsonl"), str(tmp_path / "run"), steps=1, batch_size=2)
    assert main(["train", *argv, "--fsdp", "--optim", "paged_adamw_8bit"]) == 2
    assert "--fsdp with --optim paged_adamw_8bit" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", *argv, "--fsdp"]) == 0  # one process: trained as without --fsdp
    assert "--fsdp: one process, nothing to shard; training unsharded" in capfd.readouterr().err
