"""Checkpoint in, int8 deployable model out: the entry point export stages use to get int8 models."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from quantize.torch_ao import QuantizationError, dynamic_int8, static_int8
from train.checkpoint import Checkpoint
from train.data import Sample, load_batch
from train.model import DeployModel

MODES = ("static", "dynamic")


def calibration_batches(ckpt: Checkpoint, samples: Sequence[Sample], batch_size: int = 32,
                        progress: bool = True) -> Iterator[torch.Tensor]:
    """Normalized batches (what the network sees) from calibration samples of the training split."""
    from tqdm import tqdm

    pre = DeployModel(nn.Identity(), ckpt.spec).preprocess
    starts = range(0, len(samples), batch_size)
    for i in tqdm(starts, desc="calibrating", unit="batch", disable=not progress, leave=False):
        # Yield outside the context: a generator suspended inside inference_mode interleaves with the
        # consumer's own context managers and left inference mode switched on for the whole process.
        with torch.inference_mode():
            batch = pre(torch.from_numpy(load_batch(samples[i:i + batch_size], ckpt.spec)))
        yield batch


def make_int8_model(ckpt: Checkpoint, mode: str = "static", engine: str = "qnnpack",
                    calib_samples: Sequence[Sample] | None = None, keep_float: Sequence[str] = (),
                    progress: bool = True, reduce_range: str = "auto") -> nn.Module:
    """DeployModel whose network is int8: takes the same [0, 1] input as the float model."""
    if mode not in MODES:
        raise QuantizationError(f"int8 mode must be one of {MODES}, got {mode!r}")
    net = ckpt.build_network()
    if mode == "dynamic":
        qnet = dynamic_int8(net)
    else:
        if not calib_samples:
            raise QuantizationError("static int8 needs calibration images: pass --data with a train split "
                                    "(or use --int8 dynamic, which needs none)")
        qnet = static_int8(net, calibration_batches(ckpt, list(calib_samples), progress=progress), engine,
                           keep_float=keep_float, reduce_range=reduce_range)
    return DeployModel(qnet, ckpt.spec).eval()


def load_calibration(index, n: int, spec, seed: int = 0, progress: bool = True) -> tuple[list[Sample], np.ndarray]:
    """A seeded sample of the TRAIN split only (never the images a report evaluates on), loaded as
    float32 (N, 3, H, W) in [0, 1]. Every class must be present, or the ranges miss its images."""
    import numpy as np
    from tqdm import tqdm

    from train.data import seeded_subset
    from train.spec import load_unit_image

    train = index.split("train")
    if not train or n < 1:
        raise QuantizationError(f"no calibration images: {index.root} has {len(train)} train-split images and "
                                f"--calib-size is {n}; static int8 needs a train split (a split column in "
                                f"labels.csv, or a folder dataset, which gets a seeded split) and --calib-size >= 1")
    samples = seeded_subset(train, n, seed)
    missing = [c for i, c in enumerate(index.class_names) if not any(s.label == i for s in samples)]
    if missing:
        raise QuantizationError(f"the calibration sample ({len(samples)} train images, seed {seed}) has no "
                                f"images of class {missing}; raise --calib-size (at least {len(index.class_names)}) "
                                f"or add train-split images of that class")
    arr = np.stack([load_unit_image(s.path, spec) for s in tqdm(samples, desc="loading calibration images",
                                                                  unit="img", disable=not progress, leave=False)])
    return samples, arr.astype(np.float32)


def normalized_batches(spec, array, batch_size: int = 32, progress: bool = True) -> Iterator[torch.Tensor]:
    """Calibration batches as the network sees them (normalized by the model's own Preprocess)."""
    from tqdm import tqdm

    pre = DeployModel(nn.Identity(), spec).preprocess
    for i in tqdm(range(0, len(array), batch_size), desc="calibrating", unit="batch", disable=not progress,
                  leave=False):
        with torch.inference_mode():  # compute, then yield outside the block (see calibration_batches)
            batch = pre(torch.from_numpy(array[i:i + batch_size]))
        yield batch


def static_from_array(ckpt: Checkpoint, array, engine: str = "qnnpack", keep_float: Sequence[str] = (),
                      only: Sequence[str] | None = None, progress: bool = True,
                      reduce_range: str = "auto") -> nn.Module:
    """Static int8 DeployModel calibrated on an already loaded [0, 1] array (loaded once, used for
    both engines, ONNX Runtime and the sensitivity search)."""
    qnet = static_int8(ckpt.build_network(), normalized_batches(ckpt.spec, array, progress=progress), engine,
                       keep_float=keep_float, only=only, reduce_range=reduce_range)
    return DeployModel(qnet, ckpt.spec).eval()
