"""The pieces a training run is assembled from: data, model, loss, optimizer, schedule.

Each builder takes the run's plain-dict config, so the same config rebuilds the same run on --resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.data import DataError, DatasetIndex, assign_splits, check_images, discover
from train.distributed import DistContext, EpochSampler
from train.errors import ToolkitError
from train.spec import PreprocessSpec

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
BALANCE = ("loss", "sampler", "none")


class TrainError(ToolkitError, ValueError):
    """A setting, run folder or resume request that cannot be honoured; the message says what to do."""


def check_choices(cfg: dict[str, Any]) -> None:
    """Fail before any work on a value outside the documented choices."""
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("balance", BALANCE)):
        if cfg[key] not in choices:
            raise TrainError(f"--{key} must be one of {choices}, got {cfg[key]!r}")
    for key in ("epochs", "batch_size"):
        if int(cfg[key]) < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if not float(cfg["lr"]) > 0:
        raise TrainError(f"--lr must be positive, got {cfg['lr']}")


def prepare_index(cfg: dict[str, Any], progress: bool) -> tuple[DatasetIndex, bool]:
    """Discover, split (stratified and seeded if the data has no split) and decode-check every image.
    Returns (index, whether the split was generated here)."""
    idx = discover(cfg["data"], data_root=cfg.get("data_root"))
    generated = not idx.has_split
    if not generated and any(s.split is None for s in idx.samples):
        raise DataError(f"{cfg['data']}: some rows have a split and some do not; fill the split column "
                        f"for every row or leave it empty everywhere")
    idx = assign_splits(idx, seed=cfg["seed"], val_frac=cfg["val_frac"], test_frac=cfg["test_frac"])
    idx = check_images(idx, skip_bad=cfg["skip_bad"], progress=progress)
    for split in ("train", "val"):
        empty = [c for c, n in idx.counts(split).items() if n == 0]
        if empty:
            raise DataError(f"{cfg['data']}: class {empty[0]!r} has no images in the {split} split "
                            f"(counts {idx.counts(split)}); add images or change the split")
    return idx, generated


def make_spec(cfg: dict[str, Any], class_names: tuple[str, ...]) -> PreprocessSpec:
    return PreprocessSpec(class_names=class_names, input_size=cfg["input_size"], resize=cfg["resize"],
                          contrast_stretch=bool(cfg["contrast_stretch"]))


def class_weights(idx: DatasetIndex) -> torch.Tensor:
    """Inverse-frequency weights over the train split, mean 1: rare classes count as much as common."""
    counts = torch.tensor(list(idx.counts("train").values()), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)


def make_train_loader(idx: DatasetIndex, spec: PreprocessSpec, cfg: dict[str, Any],
                      ctx: DistContext) -> torch.utils.data.DataLoader:
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
    sampler = EpochSampler(len(samples), ctx, cfg["seed"], weights)
    per_rank_batch = cfg["batch_size"] // ctx.world_size
    # drop_last: a final batch of one image breaks BatchNorm at small input sizes (1x1 at layer4)
    return torch.utils.data.DataLoader(
        ImageDataset(samples, spec, augment=train_augment(spec)), batch_size=per_rank_batch,
        sampler=sampler, num_workers=cfg["workers"], drop_last=len(sampler) > per_rank_batch,
        pin_memory=ctx.device.type == "cuda", generator=torch.Generator())


def make_model(cfg: dict[str, Any], spec: PreprocessSpec, init: bool) -> nn.Module:
    """DeployModel (in-graph normalization) around ResNet-18; `init=False` on resume (weights follow)."""
    from train.model import DeployModel, apply_freeze, build_network, init_weights

    net = build_network("resnet18", num_classes=spec.num_classes)
    if init:
        init_weights(net, cfg["weights"])
    apply_freeze(net, cfg["freeze"])
    return DeployModel(net, spec)


def make_criterion(cfg: dict[str, Any], idx: DatasetIndex, device: torch.device) -> nn.Module:
    weight = class_weights(idx).to(device) if cfg["balance"] == "loss" else None
    return nn.CrossEntropyLoss(weight=weight)


def make_optimizer(cfg: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True,
                               weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def make_scheduler(cfg: dict[str, Any], opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped every batch, so the schedule is the same whatever the epoch length."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    if cfg["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


def data_summary(idx: DatasetIndex, generated: bool, out_dir: Path) -> dict[str, Any]:
    return {
        "root": str(idx.root), "layout": idx.layout, "class_names": list(idx.class_names),
        "counts": {s: idx.counts(s) for s in ("train", "val", "test")},
        "split_generated": generated, "splits_csv": str(out_dir / "splits.csv") if generated else None,
        "split_fingerprint": idx.fingerprint(),
        "skipped_images": [{"path": p, "error": e} for p, e in idx.skipped],
    }
