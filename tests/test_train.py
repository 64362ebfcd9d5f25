import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from qlora_rt.cli import main
from qlora_rt.config import TrainConfig
from qlora_rt.errors import QloraError
from qlora_rt.train import train


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_llama, tiny_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(QloraError, match=r"step \d+: the (loss|gradient norm) is not finite; .*checkpoint \(step 1\)"):
        train(config(tiny_llama, tiny_data, run, lr=1e30, warmup=0, checkpoint_every=1, max_grad_norm=0))
    ckpt = load_file(str(run / "checkpoint" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in ckpt.values())
    assert not (run / "adapter").exists()


def test_run_folder_is_never_overwritten_and_resume_needs_a_run(tiny_llama, tiny_data, tmp_path):
    cfg = config(tiny_llama, tiny_data, tmp_path / "run", steps=2)
    train(cfg)
    with pytest.raises(QloraError, match="already holds a run; pass --resume"):
        train(cfg)
    with pytest.raises(QloraError, match="--resume: .*run.yaml not found"):
        train(config(tiny_llama, tiny_data, tmp_path / "new", resume=True))
    with pytest.raises(QloraError, match=r"settings differ .*rank \(4 -> 8\)"):
        train(config(tiny_llama, tiny_data, tmp_path / "run", steps=2, rank=8, resume=True))


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
