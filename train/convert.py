"""Bring your own weights: turn a torchvision or notebook-style ResNet-18 state dict into a toolkit checkpoint.

    python -m train.convert --weights FOREIGN.pt --out runs/imported/best.pt [--classes A B C D]
        [--size 224] [--resize bilinear] [--mean M M M] [--std S S S] [--contrast-stretch]

Foreign weights carry no preprocessing, so you state it here (defaults: the cxr4 recipe, ImageNet
mean/std, 224 px, grayscale to 3 channels); it travels with the checkpoint to every later stage.
A network trained on one gray channel (conv1 with 1 input channel) takes one `--mean M --std S`, the values
its training normalized with; it becomes the same function on the three gray channels the toolkit feeds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from train.atomic import check_writable_file
from train.errors import cli_errors
from train.spec import DEFAULT_CLASSES, IMAGENET_MEAN, IMAGENET_STD, RESIZE_METHODS, PreprocessSpec


def convert(weights: str | Path, out: str | Path, *, classes: tuple[str, ...] = DEFAULT_CLASSES,
            size: int = 224, resize: str = "bilinear", mean: tuple[float, ...] = IMAGENET_MEAN,
            std: tuple[float, ...] = IMAGENET_STD, contrast_stretch: bool = False) -> Path:
    """Write the toolkit checkpoint; the output's class count must match the weights' head."""
    from train.checkpoint import convert_to_toolkit

    spec = PreprocessSpec(class_names=tuple(classes), input_size=size, resize=resize, mean=tuple(mean),
                          std=tuple(std), contrast_stretch=contrast_stretch)
    return convert_to_toolkit(weights, out, spec)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__.strip().splitlines()[0])
    p.add_argument("--weights", required=True, help="foreign .pt: torchvision state dict or "
                                                     "{'model_state_dict': {'resnet18.*': ...}}")
    p.add_argument("--out", required=True, help="toolkit checkpoint to write (e.g. runs/imported/best.pt)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                   help=f"class names in the model's output order (default {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--size", type=int, default=224, help="input side in pixels the weights expect (default 224)")
    p.add_argument("--resize", choices=RESIZE_METHODS, default="bilinear", help="resize method (default bilinear)")
    p.add_argument("--mean", type=float, nargs="+", default=list(IMAGENET_MEAN),
                   help="RGB mean, 3 values, or 1 for all three (a network trained on gray images; default ImageNet)")
    p.add_argument("--std", type=float, nargs="+", default=list(IMAGENET_STD),
                   help="RGB std, 3 values, or 1 for all three (default ImageNet)")
    p.add_argument("--contrast-stretch", action="store_true", help="per-image min-max stretch before normalizing")
    a = p.parse_args(argv)
    for flag in ("mean", "std"):
        if len(getattr(a, flag)) not in (1, 3):
            p.error(f"--{flag} takes 3 values (one per RGB channel) or 1 (the same for all three)")
        setattr(a, flag, getattr(a, flag) * (3 // len(getattr(a, flag))))
    check_writable_file(a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from train.checkpoint import CheckpointError
    from train.spec import SpecError

    try:
        out = convert(a.weights, a.out, classes=tuple(a.classes), size=a.size, resize=a.resize,
                      mean=tuple(a.mean), std=tuple(a.std), contrast_stretch=a.contrast_stretch)
    except (CheckpointError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
