"""Multi-process training with PyTorch's own DistributedDataParallel, active only under torchrun.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them every helper here is a no-op, so a plain
`python -m train` behaves exactly as single-process training. NCCL on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from train.errors import ToolkitError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")


class DeviceError(ToolkitError, ValueError):
    """A --device that this machine or launch mode cannot use."""


@dataclass
class DistContext:
    """Who this process is. `enabled` is False for a plain single-process run."""

    device: torch.device
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        if not self.enabled:
            return None
        return "nccl" if self.device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(pref: str = "auto", local_rank: int = 0, distributed: bool = False) -> torch.device:
    """auto: CUDA, then MPS, then CPU. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if pref not in DEVICES:
        raise DeviceError(f"--device must be one of {DEVICES}, got {pref!r}")
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if pref == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    if pref == "mps" and not mps_ok:
        raise DeviceError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    if pref == "mps" and distributed:
        raise DeviceError("--device mps cannot be used with torchrun (no MPS process-group backend); "
                          "use --device cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if pref == "mps" or (pref == "auto" and mps_ok and not distributed):
        return torch.device("mps")
    return torch.device("cpu")


def init(device_pref: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; otherwise just pick the device."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_pref))
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = resolve_device(device_pref, local, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = DistContext(device, True, rank, world, local)
    if not dist.is_initialized():
        dist.init_process_group(backend=ctx.backend)
    log.info("rank %d/%d on %s (backend %s)", rank, world, device, ctx.backend)
    return ctx


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrap for training; the caller keeps the unwrapped model for saving and evaluation."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum a few numbers (loss sums, counts) over ranks."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (the list of one on a single process)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Make BatchNorm running statistics identical on every rank (rank 0's), so validation and the
    saved checkpoint do not depend on which rank computed them."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def shard(n: int, ctx: DistContext) -> list[int]:
    """This rank's share of n evaluation items: no padding, so no item is counted twice."""
    return list(range(ctx.rank, n, ctx.world_size))


def replica_fingerprint(model: nn.Module, input_size: int) -> dict[str, Any]:
    """sha256 of all weights and buffers, plus logits on a fixed input: equal on every rank iff in sync."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    x = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x.to(device)).float().cpu()
    model.train(was_training)
    return {"state_sha256": h.hexdigest(), "logits": logits.tolist()}


def check_replicas(model: nn.Module, input_size: int, ctx: DistContext) -> dict[str, Any] | None:
    """Gather every rank's fingerprint; rank 0 records whether the replicas stayed in sync."""
    if not ctx.enabled:
        return None
    prints = all_gather_objects(replica_fingerprint(model, input_size), ctx)
    in_sync = len({p["state_sha256"] for p in prints}) == 1 and all(p["logits"] == prints[0]["logits"]
                                                                     for p in prints)
    if not in_sync:
        log.error("DDP replicas differ after training: %s", [p["state_sha256"][:12] for p in prints])
    return {"world_size": ctx.world_size, "backend": ctx.backend, "replicas_in_sync": in_sync,
            "per_rank": prints}


class EpochSampler(torch.utils.data.Sampler):
    """Per-epoch reshuffled indices (optionally class-weighted, with replacement), sharded over ranks.

    Seeded by (seed, epoch) alone, so a resumed run sees the same order as an uninterrupted one, and
    with one process it is just a seeded shuffle. Works like DistributedSampler: call set_epoch."""

    def __init__(self, n: int, ctx: DistContext, seed: int, weights: Sequence[float] | None = None):
        self.n, self.rank, self.world, self.seed = n, ctx.rank, ctx.world_size, seed
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.per_rank = -(-n // self.world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist()
            order += order[: total - self.n]  # pad like DistributedSampler so ranks see equal counts
        return iter(order[self.rank:total:self.world])
