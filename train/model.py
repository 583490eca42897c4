"""The network: torchvision ResNet-18 with a class head, and the in-graph preprocessing every export carries."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from train.errors import ToolkitError
from train.spec import PreprocessSpec
from train.weights_file import read_state_dict, widen_gray_stem

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18",)
FREEZE_MODES = ("none", "layer4", "head")


class WeightsError(ToolkitError, RuntimeError):
    """Pretrained or user weights that cannot be loaded."""


class Preprocess(nn.Module):
    """The inside-the-model half of the spec: [0, 1] RGB -> (optional contrast stretch) -> normalized.

    Lives inside every exported graph so an app feeds [0, 1] floats and cannot get mean/std wrong.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.contrast_stretch = bool(spec.contrast_stretch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.contrast_stretch:
            x = stretch_contrast(x)
        return (x - self.mean) / self.std


def stretch_contrast(x: torch.Tensor) -> torch.Tensor:
    """Each image of the batch scaled to span [0, 1]; per image over all its values, so any layout."""
    lo = torch.amin(x, dim=(1, 2, 3), keepdim=True)
    hi = torch.amax(x, dim=(1, 2, 3), keepdim=True)
    return (x - lo) / torch.clamp(hi - lo, min=1e-6)


class DeployModel(nn.Module):
    """Preprocess + network: takes (N, 3, H, W) floats in [0, 1], returns (N, classes) logits."""

    def __init__(self, net: nn.Module, spec: PreprocessSpec) -> None:
        super().__init__()
        self.preprocess = Preprocess(spec)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


def channels_last(model: nn.Module) -> nn.Module:
    """`model` with its conv weights in channels-last (NHWC) order, for float inference on the CPU. oneDNN's
    convolutions then keep activations NHWC from layer to layer instead of converting each one: measured 5%
    faster at batch 1 and 20% at batch 32 on an AMD EPYC, logits equal to 1e-6. PyTorch Mobile's
    performance recipe asks for the same, so frozen TorchScript files keep it. Returns `model` (in place)."""
    return model.to(memory_format=torch.channels_last)


def build_network(arch: str = "resnet18", num_classes: int = 4) -> nn.Module:
    """A randomly initialised network; weights are loaded separately so loading is explicit."""
    import torchvision

    if arch not in ARCHITECTURES:
        raise WeightsError(
            f"unknown architecture {arch!r} (a checkpoint's 'arch' field); this toolkit builds only "
            f"{', '.join(ARCHITECTURES)}. Use a checkpoint written by `python -m train`, or turn plain "
            f"ResNet-18 weights into one with `python -m train.convert`")
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def weight_bytes(arch: str = "resnet18", num_classes: int = 4) -> int:
    """Bytes of the network's float32 weights and buffers: the unit the commands' room checks count in
    (a checkpoint, an exported fp32 model and a quantization report's ONNX files are multiples of it)."""
    return sum(t.numel() * t.element_size() for t in build_network(arch, num_classes).state_dict().values())


def imagenet_weights_path() -> Path:
    """Where torchvision caches the ImageNet ResNet-18 weights (honours TORCH_HOME)."""
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_imagenet_weights() -> Path:
    """torchvision's ImageNet ResNet-18 file in its cache, downloaded (hash-checked) when it is not there yet.
    Training calls it before it makes the run folder, so an offline machine fails before any work."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = imagenet_weights_path()
    if not cached.is_file():
        try:
            weights.get_state_dict(progress=False, check_hash=True, weights_only=True)  # writes the cache
        except Exception as err:  # offline: URLError, socket errors, hash mismatch of a partial file
            raise WeightsError(
                f"could not get torchvision's ImageNet weights for resnet18 ({err}). Offline, download "
                f"{weights.url} elsewhere and put it at {cached} (set TORCH_HOME to move that folder), or "
                f"train with --weights none, or pass --weights PATH to a local state dict."
            ) from err
    return cached


def load_imagenet_backbone(net: nn.Module) -> None:
    """Copy torchvision's ImageNet weights into `net`, keeping `net`'s own class head. The cached file is read
    like any user's checkpoint: torchvision's own loader unpickles it with weights_only=False and, once it is in
    the cache, without checking its hash."""
    state = read_state_dict(fetch_imagenet_weights())
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise WeightsError(f"ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")


def load_local_weights(net: nn.Module, path: str | Path) -> None:
    """Initialise from a local state dict or toolkit checkpoint; a head of another size is re-initialised."""
    read = read_state_dict(path)
    state = widen_gray_stem(read)
    if state is not read:
        log.info("%s: conv1 reads 1 gray channel; starting from its weights split over the 3 gray channels", path)
    own = net.state_dict()
    head_mismatch = [k for k in ("fc.weight", "fc.bias") if k in state and state[k].shape != own[k].shape]
    for k in head_mismatch:
        log.warning("%s: %s has shape %s, model needs %s; starting that layer fresh",
                    path, k, tuple(state[k].shape), tuple(own[k].shape))
        del state[k]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(head_mismatch):
        raise WeightsError(f"{path}: weights do not fit resnet18: missing {missing}, unexpected {unexpected}")


def check_weights_arg(weights: str) -> None:
    """--weights is 'imagenet', 'none' or the path of an existing file."""
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise WeightsError(f"--weights {weights!r}: not 'imagenet', 'none' or an existing file")


def init_weights(net: nn.Module, weights: str) -> None:
    """`weights` is 'imagenet', 'none' or a path to a local state dict / checkpoint."""
    check_weights_arg(weights)
    if weights == "none":
        return
    if weights == "imagenet":
        load_imagenet_backbone(net)
        return
    load_local_weights(net, weights)


def apply_freeze(net: nn.Module, mode: str) -> None:
    """'layer4' trains layer4 and the head (the seeds' transfer recipe); 'head' trains only fc."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"--freeze must be one of {FREEZE_MODES}, got {mode!r}")
    if mode == "none":
        return
    trainable = ("fc.",) if mode == "head" else ("fc.", "layer4.")
    for name, p in net.named_parameters():
        p.requires_grad = name.startswith(trainable)
