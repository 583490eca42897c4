"""Per-layer quantization sensitivity, and the accuracy-aware fallback that keeps the worst layers float.

Method: quantize ONE layer at a time (everything else float), calibrate it on training images, and
measure how far the network's logits move from the float network's on those images. A layer whose
lone quantization moves the logits most is the one worth keeping in float when the fully quantized
model misses its accuracy budget. No stock tool offers this for PyTorch Mobile models.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from quantize.torch_ao import QuantizationError, quantizable_layers, static_int8
from train.checkpoint import Checkpoint
from train.model import Preprocess

log = logging.getLogger(__name__)


def layer_sensitivity(ckpt: Checkpoint, calib: np.ndarray, engine: str, *, sample_size: int = 32,
                      layers: Sequence[str] | None = None, progress: bool = True,
                      reduce_range: str = "auto") -> list[dict[str, Any]]:
    """Rank layers by the logit error their quantization alone causes, worst first.

    `calib` is float32 (N, 3, H, W) in [0, 1] from the training split; the first `sample_size` images
    are used both to calibrate and to measure (a ranking, not an accuracy figure).
    """
    from tqdm import tqdm

    net = ckpt.build_network()
    known = quantizable_layers(net)
    names = list(layers) if layers else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise QuantizationError(f"--sensitivity-layers {unknown} are not conv/linear layers of this network; "
                                f"choose from {known}")
    with torch.inference_mode():
        x = Preprocess(ckpt.spec)(torch.from_numpy(calib[:sample_size]))
        ref = net(x).numpy()
    rows = []
    for name in tqdm(names, desc=f"layer sensitivity ({engine})", unit="layer", disable=not progress,
                     leave=False):
        qnet = static_int8(net, [x], engine, only=[name], reduce_range=reduce_range)
        with torch.inference_mode():
            out = qnet(x).numpy()
        rows.append({"layer": name,
                     "mean_abs_logit_error": float(np.abs(out - ref).mean()),
                     "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean())})
    rows.sort(key=lambda r: r["mean_abs_logit_error"], reverse=True)
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    log.info("most sensitive layers (%s): %s", engine, [r["layer"] for r in rows[:5]])
    return rows


def most_sensitive(ranking: list[dict[str, Any]], k: int) -> list[str]:
    """The k layers to keep in float."""
    return [r["layer"] for r in ranking[:max(0, k)]]
