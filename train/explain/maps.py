"""Class-activation heatmaps on ResNet-18's layer4, and their overlays on the radiograph.

Float maps come straight from the `grad-cam` package (GradCAM, EigenCAM on `net.layer4[-1]`) run on
the DeployModel with [0, 1] input, so the CAM sees exactly the deployed graph including normalization.

Int8 networks have no gradients and no parameters (the package's BaseCAM needs both), so for them
the same maps are computed from layer4's output captured with a forward hook on `avgpool` (its input
*is* layer4's output in torchvision's ResNet, also after FX conversion) and dequantized:
  * Grad-CAM: for a global-average-pool + linear head, d logit_c / d A_k(i, j) = W[c, k] / (H W) at
    every position, so Grad-CAM's channel weights are exactly fc's row c (up to a positive scale that
    the min-max scaling removes). The int8 map uses the dequantized int8 fc weights.
  * EigenCAM: the package's own `get_2d_projection` on the dequantized activations.
Both go through the package's `scale_cam_image`; tests check the hook path reproduces the package's
float maps, so float-vs-int8 differences are the model's, not the method's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from train.data import Sample

log = logging.getLogger(__name__)

METHODS = ("gradcam", "eigencam")
METHOD_TITLES = {"gradcam": "Grad-CAM", "eigencam": "EigenCAM"}


def select_per_class(samples: Sequence[Sample], per_class: int, seed: int = 0) -> list[Sample]:
    """Up to `per_class` images of each label, chosen by a seeded shuffle of the path-sorted list."""
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        group = sorted((s for s in samples if s.label == label), key=lambda s: str(s.path))
        order = rng.permutation(len(group))[:per_class]
        chosen += [group[i] for i in sorted(order)]
    return chosen


def oriented_projection(acts: np.ndarray) -> np.ndarray:
    """EigenCAM's first principal component, signed to agree with the summed activation.

    SVD's sign is arbitrary, so raw EigenCAM can highlight the *least* active region; fixing the sign
    by the (non-negative, post-ReLU) activation total makes float and int8 maps comparable."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    proj = get_2d_projection(acts)
    total = acts.sum(axis=1)
    for i in range(len(proj)):
        p, t = proj[i].ravel(), total[i].ravel()
        if p.std() > 0 and t.std() > 0 and np.corrcoef(p, t)[0, 1] < 0:
            proj[i] = -proj[i]
    return proj


def _oriented_eigencam(model: nn.Module, layers: list[nn.Module]):
    from pytorch_grad_cam import EigenCAM

    class OrientedEigenCAM(EigenCAM):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads,
                          eigen_smooth):
            return oriented_projection(activations)

    return OrientedEigenCAM(model, layers)


def float_cams(deploy: nn.Module, x: torch.Tensor, classes: Sequence[int],
               batch_size: int = 8, progress: bool = True) -> dict[str, np.ndarray]:
    """Grad-CAM and EigenCAM (N, H, W) in [0, 1] from the grad-cam package for the given target classes."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from tqdm import tqdm

    layers = [deploy.net.layer4[-1]]
    out: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    cams = {"gradcam": GradCAM(model=deploy, target_layers=layers),
            "eigencam": _oriented_eigencam(deploy, layers)}
    try:
        starts = range(0, len(x), batch_size)
        for i in tqdm(starts, desc="float CAMs", unit="batch", disable=not progress, leave=False):
            xb = x[i:i + batch_size]
            targets = [ClassifierOutputTarget(int(c)) for c in classes[i:i + batch_size]]
            # inference_mode(False): a caller's leaked inference mode would silently kill the gradients
            with torch.inference_mode(False), torch.enable_grad():
                for name, cam in cams.items():
                    out[name].append(cam(input_tensor=xb, targets=targets))
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return {m: np.concatenate(v) if v else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)
            for m, v in out.items()}


def _linear_weight(fc: nn.Module) -> torch.Tensor:
    """fc's weight as float: quantized Linear modules expose it as a method returning an int8 tensor."""
    w = fc.weight() if callable(fc.weight) else fc.weight
    return (w.dequantize() if w.is_quantized else w).detach().float()


def _package_scaling(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """BaseCAM's post-processing for one target layer: ReLU, min-max + resize, then min-max again
    (aggregate_multi_layers re-scales after upsampling)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(np.maximum(cam, 0), size))


def hooked_cams(model: nn.Module, x: torch.Tensor, classes: Sequence[int], batch_size: int = 8,
                progress: bool = True,
                align_to: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Grad-CAM (exact GAP+linear identity) and EigenCAM from a forward hook, for float or int8 models.

    Returns ({method: (N, H, W) in [0, 1]}, logits (N, classes), EigenCAM projections (N, h, w) as
    oriented by `oriented_projection`). With `align_to` (another model's projections) each EigenCAM
    map takes the sign that agrees with it: the SVD sign is a convention, not something the model chose."""
    from tqdm import tqdm

    net = getattr(model, "net", model)
    pool, fc = getattr(net, "avgpool", None), getattr(net, "fc", None)
    if pool is None or fc is None:
        raise ValueError("heatmaps need a torchvision ResNet-style network with 'avgpool' and 'fc' modules")
    weight = _linear_weight(fc).numpy()
    size = (x.shape[-1], x.shape[-2])
    captured: list[torch.Tensor] = []
    handle = pool.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    maps: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    logits, projections = [], []
    try:
        for i in tqdm(range(0, len(x), batch_size), desc="hooked CAMs", unit="batch",
                      disable=not progress, leave=False):
            captured.clear()
            with torch.inference_mode():
                logits.append(model(x[i:i + batch_size]).float().numpy())
            a = captured[0]
            acts = (a.dequantize() if a.is_quantized else a).float().numpy()
            cls = np.asarray(classes[i:i + batch_size], dtype=int)
            maps["gradcam"].append(_package_scaling(np.einsum("nk,nkhw->nhw", weight[cls], acts), size))
            proj = oriented_projection(acts)
            projections.append(proj.copy())
            if align_to is not None:
                ref = align_to[i:i + len(proj)]
                sign = np.where((proj * ref).sum(axis=(1, 2)) < 0, -1.0, 1.0).astype(np.float32)
                proj *= sign[:, None, None]
            maps["eigencam"].append(_package_scaling(proj, size))
    finally:
        handle.remove()
    maps_out = {m: np.concatenate(v) for m, v in maps.items()}
    return maps_out, np.concatenate(logits), np.concatenate(projections)


def overlay(image_chw: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3): the package's show_cam_on_image on the [0, 1] radiograph."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.ascontiguousarray(np.transpose(image_chw, (1, 2, 0)), dtype=np.float32)
    return show_cam_on_image(rgb, cam.astype(np.float32), use_rgb=True, image_weight=0.55)


def save_png(dest: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    from train.atomic import atomic_path

    with atomic_path(dest) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def save_grid(dest: Path, tiles: list[list[np.ndarray]], titles: list[list[str]],
              row_labels: list[str], suptitle: str, tile_inches: float = 2.2) -> None:
    """A rows x cols figure of RGB tiles with small captions (empty cells stay blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.atomic import atomic_path

    rows, cols = len(tiles), max((len(r) for r in tiles), default=1)
    height = tile_inches * rows + 0.6
    fig, axes = plt.subplots(rows, cols, figsize=(tile_inches * cols, height), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(tiles[r]):
                ax.imshow(tiles[r][c])
                ax.set_title(titles[r][c], fontsize=7)
        axes[r][0].text(-0.08, 0.5, row_labels[r], transform=axes[r][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # keep the column captions clear of the title
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
