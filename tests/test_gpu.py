"""The CUDA path: bf16 compute over the bitsandbytes kernels, paged 8-bit AdamW. Skipped without CUDA."""

import pytest

from qlora_rt.config import TrainConfig
from qlora_rt.train import train

pytestmark = pytest.mark.gpu  # conftest skips these without CUDA


@pytest.mark.parametrize("optim", ["adamw", "paged_adamw_8bit"])
def test_cuda_bf16_training_lowers_eval_loss(tiny_llama, tiny_data, tmp_path, optim):
    r = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"),
                          eval_data=str(tiny_data / "eval.jsonl"), out=str(tmp_path / "run"), steps=12, rank=4,
                          batch_size=2, seq_len=64, lr=2e-2, device="cuda", optim=optim, checkpoint_every=0))
    first = [l for l in open(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in l][0]
    assert r.eval_loss < __import__("json").loads(first)["eval_loss"] - 0.2
