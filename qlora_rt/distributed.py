"""Training on several processes with PyTorch's own torch.distributed (DDP), launched the standard way.

    torchrun --nproc-per-node 2 -m qlora_rt train ...       # or: qlora-rt train --nproc 2 ...

Every process holds the 4-bit base and its own copy of the adapters; DDP all-reduces only the adapters'
gradients. Every rank walks the same global data order and takes its own slice of each global micro-batch
(`--batch-size` examples per rank), and the loss is normalised by the global count of target tokens (or
examples), so N processes x batch b make the same update as 1 process x batch N*b. Rank 0 alone writes
the run folder and shows progress. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora_rt.errors import QloraError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup(device: torch.device, timeout_s: float) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT); a single process without those runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64), one collective; the values as they are on one process.
    A NaN or inf on any rank makes the sum non-finite on every rank, so all stop together."""
    if not d.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(d: Dist, obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.on:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def broadcast_parameters(d: Dist, params: list[torch.nn.Parameter]) -> None:
    """The adapters start equal on every rank (rank 0's); the frozen base is deterministic and not sent."""
    if d.on:
        for p in params:
            dist.broadcast(p.data, 0)


def launch(argv: list[str], nproc: int) -> int:
    """`qlora-rt train --nproc N ...`: the same command under torchrun (torch.distributed.run), N processes."""
    if nproc > (torch.cuda.device_count() or os.cpu_count() or 1):
        print(f"--nproc {nproc}: more processes than {'GPUs' if torch.cuda.is_available() else 'CPU cores'} here",
              file=sys.stderr)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import logging

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the summary below says it once
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "qlora_rt",
                                         "train", *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)  # torchrun itself, in this process: its agent starts and watches the workers
    except ChildFailedError as e:  # the failing rank said why above; torchrun's report would only repeat it
        code = next(iter(e.failures.values())).exitcode
        print(f"qlora-rt train: {len(e.failures)} of {nproc} processes stopped (exit {code}); "
              "the others were stopped with them", file=sys.stderr)
        return code if code > 0 else 1
    except KeyboardInterrupt:
        return 130
    return 0


def lost_peer(e: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (its connection closed, or it timed out)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("connection", "timed out", "timeout", "gloo", "nccl", "broken pipe", "peer"))


def check_world(saved: dict, d: Dist) -> None:
    """A resumed run keeps its world size: each optimizer step's global batch depends on it."""
    was = saved.get("world_size", 1)
    if was != d.world:
        raise QloraError(f"--resume: the run was trained on {was} process{'es' if was > 1 else ''}; resume it with "
                         f"{was} (each step's global batch is --batch-size x --grad-accum x processes), or start a "
                         "new run")
