"""Training on several processes with PyTorch's own torch.distributed (DDP or FSDP2), launched the standard way.

    torchrun --nproc-per-node 2 -m qlora_rt train ...       # or: qlora-rt train --nproc 2 ...
    torchrun --nproc-per-node 2 -m qlora_rt train --fsdp ...

DDP (the default): every process holds the 4-bit base and its own copy of the adapters; DDP all-reduces
only the adapters' gradients. FSDP (`--fsdp`, PyTorch's `fully_shard`): every transformer block is its
own unit and the rest (embeddings, final norm, head) the root's; each process keeps 1/N of every weight
(the 4-bit bytes too), of the adapters, their gradients and the optimizer's state, and all-gathers a
block's weights just before the block runs. Every rank walks the same global data order and takes its own
slice of each global micro-batch (`--batch-size` examples per rank), and the loss is normalised by the global
count of target tokens (or examples), so N processes x batch b make the same update as 1 process x batch N*b.
Rank 0 alone writes the run folder and shows progress. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager
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
        nccl = dist.get_backend() == "nccl"
        for p in params:
            # NCCL sends GPU tensors only (FSDP builds on the CPU)
            t = p.data.cuda() if nccl and not p.is_cuda else p.data
            dist.broadcast(t, 0)
            if t is not p.data:
                p.data.copy_(t)


def launch(argv: list[str], nproc: int) -> int:
    """`qlora-rt train --nproc N ...`: the same command under torchrun (torch.distributed.run), N processes."""
    if nproc > (torch.cuda.device_count() or os.cpu_count() or 1):
        print(f"--nproc {nproc}: more processes than {'GPUs' if torch.cuda.is_available() else 'CPU cores'} here",
              file=sys.stderr)
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the summary below says it once
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "qlora_rt",
                                         "train", *argv])
    # the workers share the cores; the variable is set for them only, the caller's environment is left as it was
    threads = os.environ.get("OMP_NUM_THREADS")
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
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
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


# attributes a 4-bit weight carries beside its bytes (qlora_rt/base/formats.py): its format and statistics
_QUANT_ATTRS = ("int4", "quant_state")


def shard(root: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> tuple[int, int]:
    """FSDP2 over `root` (the module every forward goes through): each of `model`'s transformer blocks (the
    classes transformers names in `_no_split_modules`) its own unit, everything else the root's.

    A 4-bit weight is a Parameter of packed bytes with its format's state as attributes (`int4`,
    `quant_state`); FSDP shards the bytes (dim 0: whole output rows) and gathers them into a Parameter of
    its own, so the state is kept on the module and put back on whatever weight it holds before each
    forward. The per-block statistics (1/32 to 1/4 of the bytes) stay whole on every process.
    A model built on the CPU moves to `device` a unit at a time as it is sharded.
    Returns (bytes of parameters this process holds, bytes of all parameters)."""
    from torch.distributed.fsdp import fully_shard

    stashed = []
    for m in root.modules():
        w = m._parameters.get("weight")
        attrs = {k: getattr(w, k) for k in _QUANT_ATTRS if getattr(w, k, None) is not None} if w is not None else {}
        if attrs:
            m._parameters["weight"] = torch.nn.Parameter(w.data, requires_grad=False)  # bitsandbytes' subclass off
            stashed.append((m, {k: _state_to(v, device) for k, v in attrs.items()}))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise QloraError(f"--fsdp: {type(model).__name__} names no transformer block class to shard by")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for m, attrs in stashed:
        m.register_forward_pre_hook(_put_back(attrs))
    held = whole = 0
    for p in root.parameters():
        held += p.to_local().numel() * p.element_size()
        whole += p.numel() * p.element_size()
    return held, whole


def _state_to(state, device: torch.device):
    """A 4-bit weight's statistics on `device` (FSDP moves parameters; these are not)."""
    if hasattr(state, "to") and not isinstance(state, torch.Tensor):  # bitsandbytes' QuantState: in place
        state.to(device)
        return state
    for name in ("scales", "zeros", "mins"):  # qlora_rt.base.packed_int4.Int4
        if getattr(state, name, None) is not None:
            setattr(state, name, getattr(state, name).to(device))
    return state


def _put_back(attrs: dict):
    def hook(module, args):
        for k, v in attrs.items():
            setattr(module.weight, k, v)

    return hook


def sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def gathered(root: torch.nn.Module, optimizer=None):
    """For saving: the trainable parameters whole in their modules (FSDP: gathered from every rank, so every
    rank enters this together) and the optimizer's state dict (FSDP: whole, keyed by parameter name, on rank
    0 only); unsharded, the model as it is and `optimizer.state_dict()`. The sharded parameters are back on
    exit."""
    if not sharded(root):
        yield optimizer.state_dict() if optimizer is not None else None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = None
    if optimizer is not None:
        state = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    swapped = []
    for m in root.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.requires_grad:
                m._parameters[name] = torch.nn.Parameter(full(p.data).detach())
                swapped.append((m, name, p))
    try:
        yield state
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def load_optimizer(root: torch.nn.Module, optimizer, state: dict) -> None:
    """The inverse of `gathered`'s optimizer state: FSDP's whole state dict re-sharded, or a plain one."""
    if not sharded(root):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
