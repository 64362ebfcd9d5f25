"""The CUDA path: bf16 compute over the bitsandbytes kernels, paged 8-bit AdamW, FSDP over NCCL.

Skipped without CUDA."""

import pytest

from qlora_rt.config import TrainConfig
from qlora_rt.train.run import train

pytestmark = pytest.mark.gpu  # conftest skips these without CUDA


@pytest.mark.parametrize("optim", ["adamw", "paged_adamw_8bit"])
def test_cuda_bf16_training_lowers_eval_loss(tiny_llama, tiny_data, tmp_path, optim):
    r = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"),
                          eval_data=str(tiny_data / "eval.jsonl"), out=str(tmp_path / "run"), steps=12, rank=4,
                          batch_size=2, seq_len=64, lr=2e-2, device="cuda", optim=optim, checkpoint_every=0))
    first = [l for l in open(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in l][0]
    assert r.eval_loss < __import__("json").loads(first)["eval_loss"] - 0.2


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_fsdp_on_two_gpus_makes_the_update_of_one_process(tiny_llama, tiny_data, tmp_path, quant, capfd):
    """NCCL FSDP: the model built in host memory, each block moved to its GPU as it is sharded, the 4-bit
    statistics moved beside it; 2 GPUs x batch 2 = 1 GPU x batch 4 (bf16 compute: to bf16's precision)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from test_distributed import flags, max_diff, settings

    from qlora_rt.cli import main

    data = str(tiny_data / "train.jsonl")
    train(TrainConfig(**settings(tiny_llama, data, tmp_path / "one", quant=quant, batch_size=4, device="cuda")))
    capfd.readouterr()
    assert main(["train", *flags(str(tiny_llama), data, str(tmp_path / "two"), quant=quant, batch_size=2,
                                 device="cuda"), "--nproc", "2", "--fsdp"]) == 0
    assert "processes (FSDP: " in capfd.readouterr().err
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 2e-2
