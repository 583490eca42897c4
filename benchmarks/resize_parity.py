"""`python -m benchmarks.resize_parity`: how far an app's resize lands from the toolkit's, on real X-rays at photo size.

The model was trained and verified on images shrunk by PIL (the checkpoint's `resize`, bilinear by default, which
averages over the scale factor: antialiasing). Apps shrink photos of 1000 px and more with their own code, and the
Dart `image` package's `copyResize` samples pixels instead. Here each val image is enlarged (bicubic) to `--size`,
shrunk to the input size by each resizer, and run through the float model; the table gives the pixel difference
from the toolkit's resize and how often the top class changes. The Dart resizers are Python twins of
`copyResize` in the `image` package 4.9.2 (`lib/src/transform/copy_resize.dart`), written from its source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from train.errors import cli_errors

DEFAULT_OUT = Path("reports/resize_parity")


def dart_linear(gray: np.ndarray, size: int) -> np.ndarray:
    """copyResize(interpolation: Interpolation.linear): 4 pixels around a corner-aligned position, no antialiasing;
    the value truncated to an integer, as Dart's toInt() stores it."""
    gray = gray.astype(np.float64)  # uint8 differences would wrap around
    h, w = gray.shape
    fy, fx = np.arange(size) * (h / size), np.arange(size) * (w / size)  # Dart's y * dy, in its order
    iy, ix = fy.astype(int), fx.astype(int)
    ky, kx = (fy - iy)[:, None], (fx - ix)[None, :]
    ny, nx = np.clip(iy + 1, 0, h - 1), np.clip(ix + 1, 0, w - 1)
    cc, cn, nc, nn = gray[iy][:, ix], gray[ny][:, ix], gray[iy][:, nx], gray[ny][:, nx]
    return np.clip(cc + kx * (nc - cc + ky * (cc + nn - cn - nc)) + ky * (cn - cc), 0, 255).astype(np.uint8)


def dart_average(gray: np.ndarray, size: int) -> np.ndarray:
    """copyResize(interpolation: Interpolation.average): the mean of the whole source pixels each output covers."""
    h, w = gray.shape
    dy, dx = h / size, w / size
    ys = [(int(y * dy), max(int((y + 1) * dy), int(y * dy) + 1)) for y in range(size)]
    xs = [(int(x * dx), max(int((x + 1) * dx), int(x * dx) + 1)) for x in range(size)]
    out = np.array([[gray[y1:y2, x1:x2].mean() for x1, x2 in xs] for y1, y2 in ys])
    return np.clip(out, 0, 255).astype(np.uint8)


def dart_nearest(gray: np.ndarray, size: int) -> np.ndarray:
    """copyResize's default (Interpolation.nearest)."""
    h, w = gray.shape
    return gray[(np.arange(size) * h) // size][:, (np.arange(size) * w) // size].astype(np.uint8)


def _pil(method: str) -> Callable[[np.ndarray, int], np.ndarray]:
    from PIL import Image

    from train.spec import _pil_resample

    def resize(gray: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(gray.astype(np.uint8)).resize((size, size), _pil_resample(method)))
    return resize


def resizers(toolkit_method: str) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
    """The toolkit's own resize first (the reference), then the others an app might use."""
    ours = {f"toolkit (PIL {toolkit_method})": _pil(toolkit_method)}
    others = {f"PIL {m}": _pil(m) for m in ("bilinear", "area", "bicubic") if m != toolkit_method}
    return {**ours, **others, "Dart image: linear": dart_linear, "Dart image: average": dart_average,
            "Dart image: nearest (default)": dart_nearest}


def measure(checkpoint: Path, data: Path, images: int, size: int) -> dict[str, Any]:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from dataclasses import replace

    from train.checkpoint import load_checkpoint, training_split
    from train.data import DataError, check_images, images_origin, labelled_splits, seeded_subset
    from train.metrics import compare_logits
    from train.spec import to_gray8, upright

    ckpt = load_checkpoint(checkpoint)
    index = labelled_splits(training_split(ckpt, data), ckpt.spec.class_names)
    held_out = index.split("val") or index.split("test")
    if not held_out:
        raise DataError(f"--data {data}: no val or test images to compare the resizers on")
    checked = check_images(replace(index, samples=seeded_subset(held_out, images, seed=1)), skip_bad=True,
                           progress=False)  # an unreadable image is left out with a warning naming it
    samples = checked.samples
    if not samples:
        raise DataError(f"--data {data}: none of the chosen val or test images could be read")
    funcs, n = resizers(ckpt.spec.resize), ckpt.spec.input_size
    shrunk: dict[str, list[np.ndarray]] = {name: [] for name in funcs}
    for s in tqdm(samples, desc="resizing", unit="img"):
        with Image.open(s.path) as img:
            img.load()
            big = to_gray8(upright(img)).resize((size, size), Image.Resampling.BICUBIC)
        big_array = np.asarray(big)
        for name, f in funcs.items():
            shrunk[name].append(f(big_array, n))
    model = ckpt.build_deploy_model().eval()
    with torch.no_grad():
        logits = {name: model(torch.from_numpy(np.repeat(np.stack(v)[:, None] / np.float32(255.0), 3, axis=1)))
                  .numpy() for name, v in shrunk.items()}
    reference = next(iter(funcs))
    labels = np.array([s.label for s in samples])
    rows = []
    for name in funcs:
        diff = np.abs(np.stack(shrunk[name]).astype(int) - np.stack(shrunk[reference]).astype(int))
        compared = compare_logits(logits[reference], logits[name])
        rows.append({"resizer": name, "max_gray_levels": int(diff.max()), "mean_gray_levels": float(diff.mean()),
                     "top1_agreement": compared["top1_agreement"],
                     "accuracy": float((logits[name].argmax(1) == labels).mean()),
                     "max_abs_logit_change": compared["max_abs_logit_diff"]})
    return {"checkpoint": str(checkpoint), "data": str(data), "images": len(samples),
            "images_origin": images_origin(samples), "enlarged_to": size, "input_size": n, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Resize parity: an app's resize against the toolkit's", "",
             f"{result['images']} val images of `{result['data']}` ({result['images_origin']}), enlarged (bicubic) to "
             f"{result['enlarged_to']} px, shrunk to {result['input_size']} px by each resizer, run through the float "
             f"model of `{result['checkpoint']}`. Gray levels are of 255; the first row is the reference.", "",
             "| resizer | max gray-level change | mean | top-1 agreement | accuracy | max abs logit change |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['resizer']} | {r['max_gray_levels']} | {r['mean_gray_levels']:.2f} | "
                     f"{r['top1_agreement']:.3f} | {r['accuracy']:.3f} | {r['max_abs_logit_change']:.3f} |")
    return "\n".join(lines + [""])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resize_parity", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="the model (its preprocessing says the resize)")
    p.add_argument("--data", type=Path, required=True, help="labelled data; its val split is used")
    p.add_argument("--images", type=int, default=200, help="val images (default 200)")
    p.add_argument("--size", type=int, default=1024, help="pixels each image is enlarged to first (default 1024)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.run import BenchmarkError
    from benchmarks.report import write_md_and_json
    from train.atomic import check_writable_dir

    a = build_parser().parse_args(argv)
    check_writable_dir(a.out)
    if a.images < 1 or a.size < 1:
        raise BenchmarkError(f"--images and --size must be at least 1 (got {a.images}, {a.size})")
    result = measure(a.checkpoint, a.data, a.images, a.size)
    print(markdown(result))
    write_md_and_json(a.out, "resize_parity", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
