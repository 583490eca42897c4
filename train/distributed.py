"""Multi-process training with PyTorch's own DistributedDataParallel, active only under torchrun.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them every helper here is a no-op, so a plain
`python -m train` behaves exactly as single-process training. NCCL on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from train.errors import ToolkitError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
# How long a collective waits for a rank that neither answers nor exits, before failing the job with an
# error (PyTorch's default is 10 min for NCCL and 30 min for Gloo; a hung rank then held every GPU that long).
DEFAULT_TIMEOUT_S = 600


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
        if distributed:
            check_local_rank(local_rank, torch.cuda.device_count())
        return torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if pref == "mps" or (pref == "auto" and mps_ok and not distributed):
        return torch.device("mps")
    return torch.device("cpu")


def check_local_rank(local_rank: int, visible: int) -> None:
    """More processes than visible GPUs would put two ranks on one GPU or fail deep inside CUDA."""
    if not 0 <= local_rank < visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"LOCAL_RANK {local_rank} has no GPU: {visible} CUDA device(s) visible"
                          + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                          + f"; launch at most --nproc_per_node={visible} per machine")


def init(device_pref: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group when launched by torchrun; otherwise just pick the device.

    `timeout_s` bounds every collective: a rank that hangs (rather than exits) ends the job with an
    error on the others after that long, instead of holding every GPU indefinitely."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_pref))
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = resolve_device(device_pref, local, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = DistContext(device, True, rank, world, local)
    if not dist.is_initialized():
        dist.init_process_group(backend=ctx.backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d on %s (backend %s)", rank, world, device, ctx.backend)
    return ctx


def cleanup(ctx: DistContext, failed: bool = False) -> None:
    """Leave the process group. On the error path an orderly destroy can block on collectives the other
    ranks still wait in (NCCL): abort instead, so this rank exits, its error reaches the log and torchrun
    stops the others."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if not failed:
        dist.destroy_process_group()
    elif ctx.backend == "nccl":
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception as err:  # experimental API: exiting without it is still better than a hang
            log.warning("could not abort the NCCL process group (%s); exiting anyway", err)


def is_collective_failure(err: BaseException, ctx: DistContext) -> bool:
    """A collective that timed out or lost a peer: NCCL raises DistError subclasses, Gloo a RuntimeError
    naming its transport."""
    if not ctx.enabled:
        return False
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "gloo" in text or "Timed out" in text or "Connection closed by peer" in text))


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


def all_reduce_tensor(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of `t` over ranks, on the device and without a host sync (`t` itself on one process)."""
    if not ctx.enabled:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def from_main(build: Callable[[], Any], ctx: DistContext) -> Any:
    """`build()` on rank 0 only, its result broadcast to every rank.

    For work whose answer must be the same everywhere, such as decoding the data index: every rank doing
    it on a flaky shared filesystem could get different answers (with --skip-bad) and hang in the first
    collective. A ToolkitError on rank 0 is raised on every rank, so each ends with the same message."""
    if not ctx.enabled:
        return build()
    import torch.distributed as dist

    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", build())
        except ToolkitError as err:
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


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


LOGIT_TOLERANCE = 1e-3  # ranks on different GPU models may round the same weights' logits differently


def replicas_agree(prints: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """In sync = bit-identical weights and buffers on every rank (what DDP guarantees); the logits on a
    fixed input only have to agree within LOGIT_TOLERANCE, since kernels differ between GPU models."""
    logits = [torch.tensor(p["logits"]) for p in prints]
    diff = max(float((lg - logits[0]).abs().max()) for lg in logits)
    same_weights = len({p["state_sha256"] for p in prints}) == 1
    return {"replicas_in_sync": same_weights and diff <= LOGIT_TOLERANCE, "same_weights": same_weights,
            "max_logit_diff": diff, "logit_tolerance": LOGIT_TOLERANCE}


def check_replicas(model: nn.Module, input_size: int, ctx: DistContext) -> dict[str, Any] | None:
    """Gather every rank's fingerprint; rank 0 records whether the replicas stayed in sync."""
    if not ctx.enabled:
        return None
    prints = all_gather_objects(replica_fingerprint(model, input_size), ctx)
    verdict = replicas_agree(prints)
    if not verdict["replicas_in_sync"]:
        log.error("DDP replicas differ after training: %s (max logit difference %.3g)",
                  [p["state_sha256"][:12] for p in prints], verdict["max_logit_diff"])
    return {"world_size": ctx.world_size, "backend": ctx.backend, **verdict, "per_rank": prints}


class EpochSampler(torch.utils.data.Sampler):
    """Per-epoch reshuffled indices (optionally class-weighted, with replacement), sharded over ranks.

    Seeded by (seed, epoch) alone, so a resumed run sees the same order as an uninterrupted one, and
    with one process it is just a seeded shuffle. Works like DistributedSampler: call set_epoch.

    with_seeds=True yields (index, augmentation seed) pairs: one seed per position of the epoch's global
    order, so every image's augmentation depends only on (seed, epoch, position), never on the rank's
    loader workers, their count, or whether they persist across epochs (workers that persist keep their
    own RNG state from the first epoch, which per-epoch reseeding of the main process never reaches)."""

    def __init__(self, n: int, ctx: DistContext, seed: int, weights: Sequence[float] | None = None,
                 with_seeds: bool = False):
        self.n, self.rank, self.world, self.seed = n, ctx.rank, ctx.world_size, seed
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.per_rank = -(-n // self.world)
        self.epoch = 0
        self.with_seeds = with_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist()
            order += order[: total - self.n]  # pad like DistributedSampler so ranks see equal counts
        mine = order[self.rank:total:self.world]
        if not self.with_seeds:
            return iter(mine)
        import numpy as np

        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(total, dtype=np.uint64)
        return iter(zip(mine, (int(s) for s in seeds[self.rank:total:self.world])))
