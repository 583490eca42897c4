"""The pieces a training run is assembled from: data, model, loss, optimizer, schedule.

Each builder takes the run's plain-dict config, so the same config rebuilds the same run on --resume.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.data import (DataError, DatasetIndex, assign_splits, check_images, check_split_fractions,
                        discover, duplicate_summary, duplicate_warnings)
from train import distributed as D
from train.distributed import DistContext, EpochSampler
from train.errors import ToolkitError
from train.model import FREEZE_MODES, check_weights_arg
from train.spec import DEFAULT_CLASSES, PreprocessSpec

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
BALANCE = ("loss", "sampler", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")


class TrainError(ToolkitError, ValueError):
    """A setting, run folder or resume request that cannot be honoured; the message says what to do."""


def check_choices(cfg: dict[str, Any]) -> None:
    """Fail before any work (and before the run folder exists) on a setting outside the documented choices."""
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("balance", BALANCE),
                         ("freeze", FREEZE_MODES)):
        if cfg[key] not in choices:
            raise TrainError(f"--{key} must be one of {choices}, got {cfg[key]!r}")
    for key in ("epochs", "batch_size"):
        if int(cfg[key]) < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if cfg.get("amp", "auto") not in AMP_MODES:
        raise TrainError(f"--amp must be one of {AMP_MODES}, got {cfg['amp']!r}")
    if not float(cfg["lr"]) > 0:
        raise TrainError(f"--lr must be positive, got {cfg['lr']}")
    if cfg.get("workers") is not None and int(cfg["workers"]) < 0:
        raise TrainError(f"--workers must be 0 (load in the main process) or more, got {cfg['workers']}")
    check_split_fractions(float(cfg["val_frac"]), float(cfg["test_frac"]))
    check_weights_arg(cfg["weights"])
    make_spec(cfg, DEFAULT_CLASSES)  # --input-size and --resize, by the spec's own rules


def prepare_index(cfg: dict[str, Any], progress: bool) -> tuple[DatasetIndex, bool, dict[str, Any]]:
    """Discover, split (stratified and seeded if the data has no split), decode-check every image, and look
    for byte-identical files and look-alikes (warned about: a copy in two splits, or under two classes).
    Returns (index, whether the split was generated here, duplicate_summary)."""
    idx = discover(cfg["data"], data_root=cfg.get("data_root"))
    generated = not idx.has_split
    if not generated and any(s.split is None for s in idx.samples):
        raise DataError(f"{cfg['data']}: some rows have a split and some do not; fill the split column "
                        f"for every row or leave it empty everywhere")
    idx = assign_splits(idx, seed=cfg["seed"], val_frac=cfg["val_frac"], test_frac=cfg["test_frac"],
                        progress=progress)  # its decodes and hashes are cached for check_images
    idx = check_images(idx, skip_bad=cfg["skip_bad"], progress=progress)
    for split in ("train", "val"):
        empty = [c for c, n in idx.counts(split).items() if n == 0]
        if empty:
            raise DataError(f"{cfg['data']}: class {empty[0]!r} has no images in the {split} split "
                            f"(counts {idx.counts(split)}); add images or change the split")
    duplicates = duplicate_summary(idx)
    for line in duplicate_warnings(duplicates):
        log.warning("%s: %s", cfg["data"], line)
    return idx, generated, duplicates


def make_spec(cfg: dict[str, Any], class_names: tuple[str, ...]) -> PreprocessSpec:
    return PreprocessSpec(class_names=class_names, input_size=cfg["input_size"], resize=cfg["resize"],
                          contrast_stretch=bool(cfg["contrast_stretch"]))


def class_weights(idx: DatasetIndex) -> torch.Tensor:
    """Inverse-frequency weights over the train split, mean 1: rare classes count as much as common."""
    counts = torch.tensor(list(idx.counts("train").values()), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)


def default_workers() -> int:
    """Loader processes per training process: this machine's cores shared by the processes torchrun starts
    on it (LOCAL_WORLD_SIZE), at most 8 (decoding a 224-pixel gray PNG is cheap next to a GPU step)."""
    from train.cpu import usable_cores

    return max(1, min(8, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def make_train_loader(idx: DatasetIndex, spec: PreprocessSpec, cfg: dict[str, Any],
                      ctx: DistContext) -> torch.utils.data.DataLoader:
    """Sharded, reshuffled each epoch, augmented from per-position seeds (see EpochSampler), with workers
    that persist across epochs and pinned memory on CUDA."""
    from train.augment import train_augment
    from train.data import ImageDataset

    if cfg["batch_size"] % ctx.world_size:  # floor division would silently shrink the global batch
        raise TrainError(f"--batch-size {cfg['batch_size']} is the global batch and must divide evenly over the "
                         f"{ctx.world_size} processes; pass a multiple of {ctx.world_size}, e.g. "
                         f"{-(-cfg['batch_size'] // ctx.world_size) * ctx.world_size}")
    samples = idx.split("train")
    weights = None
    if cfg["balance"] == "sampler":
        per_class = class_weights(idx)
        weights = [float(per_class[s.label]) for s in samples]
    sampler = EpochSampler(len(samples), ctx, cfg["seed"], weights, with_seeds=True)
    per_rank_batch = cfg["batch_size"] // ctx.world_size
    workers = default_workers() if cfg.get("workers") is None else int(cfg["workers"])
    # drop_last: a final batch of one image breaks BatchNorm at small input sizes (1x1 at layer4)
    return torch.utils.data.DataLoader(
        ImageDataset(samples, spec, augment=train_augment(spec)), batch_size=per_rank_batch,
        sampler=sampler, num_workers=workers, drop_last=len(sampler) > per_rank_batch,
        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)


def make_model(cfg: dict[str, Any], spec: PreprocessSpec, init: bool) -> nn.Module:
    """DeployModel (in-graph normalization) around ResNet-18; `init=False` on resume (weights follow)."""
    from train.model import DeployModel, apply_freeze, build_network, init_weights

    net = build_network("resnet18", num_classes=spec.num_classes)
    if init:
        init_weights(net, cfg["weights"])
    apply_freeze(net, cfg["freeze"])
    return DeployModel(net, spec)


class GlobalMeanLoss(nn.Module):
    """Cross-entropy (class-weighted or not) normalised over the global batch of all ranks.

    PyTorch's weighted mean divides by the weight sum of this rank's targets only, so under DDP (which
    averages gradients) ranks whose images are rare-class count for less than on one GPU. Here each rank
    divides its weighted sum by the all-ranks weight sum (one small on-device all-reduce per step): the
    gradient is exactly that of the whole global batch on one device."""

    def __init__(self, weight: torch.Tensor | None, ctx: DistContext):
        super().__init__()
        self.ctx = ctx
        self.register_buffer("weight", weight)
        self.ce = nn.CrossEntropyLoss(weight=weight, reduction="sum")

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        local = (self.weight[y].sum() if self.weight is not None
                 else torch.tensor(float(len(y)), device=logits.device)).detach().float()
        return rank_share(self.ce(logits.float(), y), D.all_reduce_tensor(local, self.ctx), self.ctx.world_size)


def rank_share(weighted_sum: torch.Tensor, global_weight: torch.Tensor, world_size: int) -> torch.Tensor:
    """This rank's loss such that DDP's gradient average equals the global weighted mean's gradient."""
    return weighted_sum * world_size / global_weight.clamp_min(1e-12)


def make_criterion(cfg: dict[str, Any], idx: DatasetIndex, ctx: DistContext) -> nn.Module:
    weight = class_weights(idx).to(ctx.device) if cfg["balance"] == "loss" else None
    return GlobalMeanLoss(weight, ctx)


def make_optimizer(cfg: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True,
                               weight_decay=cfg["weight_decay"])
    fused = bool(params) and params[0].is_cuda  # one kernel for all parameters instead of one per tensor
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused or None)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step, None for fp32.

    auto: bf16 on CUDA GPUs that support it (same range as fp32, no loss scaler), else fp16 with a scaler;
    fp32 on the CPU and MPS. bf16 may be asked for on the CPU (autocast supports it there)."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise TrainError(f"--amp fp16 needs a CUDA GPU (this run is on {device.type}); use --amp bf16 or off")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """--deterministic: only deterministic kernels (an error names any op without one), cuDNN autotuning
    off, cuBLAS's fixed workspace. Otherwise cuDNN autotunes, which pays off for a fixed input size."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def apply_sync_bn(model: nn.Module, sync_bn: bool, ctx: DistContext) -> nn.Module:
    """--sync-bn: BatchNorm statistics over the global batch, not each GPU's share (8 GPUs at a global
    batch of 32 would otherwise normalise over 4 images). The weights and checkpoint keys are unchanged."""
    if not sync_bn:
        return model
    if not ctx.enabled:
        log.warning("--sync-bn has no effect in a single-process run")
        return model
    if ctx.device.type != "cuda":
        raise D.DeviceError("--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop the "
                            "flag for a CPU (Gloo) run")
    model.net = nn.SyncBatchNorm.convert_sync_batchnorm(model.net)
    return model


def make_scheduler(cfg: dict[str, Any], opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped every batch, so the schedule is the same whatever the epoch length."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    if cfg["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


def data_summary(idx: DatasetIndex, generated: bool, out_dir: Path, duplicates: dict[str, Any]) -> dict[str, Any]:
    return {
        "root": str(idx.root), "layout": idx.layout, "class_names": list(idx.class_names),
        "counts": {s: idx.counts(s) for s in ("train", "val", "test")},
        "split_generated": generated, "splits_csv": str(out_dir / "splits.csv") if generated else None,
        "split_fingerprint": idx.fingerprint(),
        "skipped_images": [{"path": p, "error": e} for p, e in idx.skipped],
        "identical_files": duplicates,
        "washed_out_images": {"count": len(idx.washed_out),
                              "examples": [{"path": p, "lost": lost} for p, lost in idx.washed_out[:5]]},
    }
