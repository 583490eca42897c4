"""The preprocessing specification: the one place that says how a radiograph becomes model input.

Training stores it in every checkpoint; every export, runtime, report and the Flutter manifest read it
back from there. Nothing else in the toolkit may hard-code a size, a mean or a class list.

The pipeline is split in two halves so apps cannot get it wrong:
  outside the model (decode, upright by a JPEG's EXIF orientation -> grayscale -> resize -> 3 channels -> float in
  [0, 1]) is `load_unit_image`;
  inside the model (optional contrast stretch -> (x - mean) / std) is `train.model.Preprocess`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

try:
    from train.errors import ToolkitError
except ImportError:  # shipped as cxr_spec.py in the TorchServe archive, beside its copy of train/errors.py
    from cxr_errors import ToolkitError  # type: ignore[no-redef]

DEFAULT_CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area")
CHANNEL_MODES = ("gray_to_rgb",)
SPEC_VERSION = 1


class SpecError(ToolkitError, ValueError):
    """A preprocessing specification that cannot be used."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become model input. Frozen: a spec is a fact about trained weights, not a setting."""

    class_names: tuple[str, ...] = DEFAULT_CLASSES
    input_size: int = 224
    resize: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: str = "gray_to_rgb"
    contrast_stretch: bool = False
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Batch-1 NCHW shape an exported model takes."""
        return (1, 3, self.input_size, self.input_size)

    def validate(self) -> None:
        if len(self.class_names) < 2:
            raise SpecError(f"a classifier needs at least 2 class names, got {list(self.class_names)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise SpecError(f"class names must be unique, got {list(self.class_names)}")
        if self.input_size < 16:
            raise SpecError(f"input_size must be at least 16 pixels, got {self.input_size}")
        if self.resize not in RESIZE_METHODS:
            raise SpecError(f"resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.channels not in CHANNEL_MODES:
            raise SpecError(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise SpecError("mean and std need exactly 3 values (one per RGB channel)")
        if any(s <= 0 for s in self.std):
            raise SpecError(f"std values must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise SpecError(f"unknown preprocessing fields {unknown}; this toolkit knows {sorted(known)}")
        return cls(**known)

    def with_overrides(self, **changes: Any) -> "PreprocessSpec":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        stretch = ", per-image contrast stretch" if self.contrast_stretch else ""
        return (
            f"grayscale -> {self.resize} resize to {self.input_size}x{self.input_size} -> 3 channels -> "
            f"[0,1]{stretch} -> normalize mean={list(self.mean)} std={list(self.std)}"
        )


def _pil_resample(method: str) -> int:
    from PIL import Image

    return {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
        "area": Image.Resampling.BOX,
    }[method]


class ImageReadError(ToolkitError, ValueError):
    """An image file that cannot be decoded; the message names it."""


def unreadable(path: str | Path, err: Exception) -> str:
    """The one wording for an image that cannot be decoded (PIL raises many exception types for them)."""
    return f"{path}: unreadable image ({type(err).__name__}: {err}); fix or remove it"


@contextlib.contextmanager
def _decoded(path: str | Path) -> Iterator["Image.Image"]:  # noqa: F821
    """The image at `path`, fully decoded; a file that cannot be read as one is an ImageReadError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            yield img
    except Exception as err:  # PIL raises many exception types for corrupt, truncated or non-image files
        raise ImageReadError(unreadable(path, err)) from err


def check_decodes(path: str | Path) -> str | None:
    """Decode without resizing: the cheap proof that a file is an image, before any work depends on it.
    Returns what the 8-bit conversion loses where it loses most of the image (see lost_in_8_bits), else None."""
    with _decoded(path) as img:
        return lost_in_8_bits(img)


def check_and_look(path: str | Path,
                   look: Callable[["Image.Image"], bytes]) -> tuple[str | None, bytes]:  # noqa: F821
    """check_decodes, and `look` of the image as the model reads it (upright, 8-bit gray), from one decode."""
    with _decoded(path) as img:
        return lost_in_8_bits(img), look(to_gray8(upright(img)))


def _is_16_bit(img: "Image.Image", a: np.ndarray | None = None) -> bool:  # noqa: F821
    return img.mode.startswith("I;16") or (img.mode == "I" and (np.asarray(img) if a is None else a).max(initial=0) > 255)


def lost_in_8_bits(img: "Image.Image") -> str | None:  # noqa: F821
    """A 16-bit image whose values stop below 4096 (12-bit data, as DICOM converted by hand often is) keeps
    at most 16 gray levels once scaled as 16-bit data; a float image above 255 is clipped white. Either way the
    model would learn from (and an app would never send) a nearly black or white picture."""
    if img.mode.startswith("I") and img.mode != "I;8":
        a = np.asarray(img)
        top = int(a.max(initial=0))
        if _is_16_bit(img, a) and top < 4096:
            return (f"16-bit image whose values stop at {top} (12 bits or fewer): scaled as 16-bit data it keeps "
                    f"{round(top * 255 / 65535) + 1} gray level(s)")
    if img.mode == "F":
        top = float(np.nanmax(np.asarray(img), initial=0.0))
        if top > 255:
            return f"float image with values up to {top:g}: above 255 is clipped white"
    return None


def load_gray_image(path: str | Path, spec: PreprocessSpec) -> "Image.Image":  # noqa: F821
    """Decode any PIL-readable image and return it as an 8-bit grayscale PIL image at the spec's size."""
    with _decoded(path) as img:
        return to_gray_resized(img, spec)


def to_gray8(img: "Image.Image") -> "Image.Image":  # noqa: F821
    """8-bit grayscale. 16-bit images (common for radiographs) are scaled by 255/65535: PIL's own
    convert("L") clips them at 255, which turns most of a 16-bit X-ray white. Float images with every value
    in [0, 1] (the float convention) are scaled by 255, where convert("L") turned them black; other float
    images are read as 0-255."""
    from PIL import Image

    if _is_16_bit(img):
        a = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if a.min(initial=0.0) >= 0 and a.max(initial=0.0) <= 1.0:
            return Image.fromarray(np.round(a * 255.0).astype(np.uint8))
    return img.convert("L")


def upright(img: "Image.Image") -> "Image.Image":  # noqa: F821
    """A JPEG turned as its EXIF orientation says, as photo viewers show it and as the Dart `image` package's
    JPEG decoder (4.x) returns it: a phone's photo of a film is stored sideways with orientation 6. PIL itself
    ignores the tag. Other formats are taken as stored."""
    from PIL import ImageOps

    if img.format in ("JPEG", "MPO") and img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return ImageOps.exif_transpose(img)
    return img


EXIF_ORIENTATION = 0x0112


def to_gray_resized(img: "Image.Image", spec: PreprocessSpec) -> "Image.Image":  # noqa: F821
    """Upright, grayscale, then resize: the part of preprocessing that needs an image library."""
    gray = to_gray8(upright(img))
    size = (spec.input_size, spec.input_size)
    if gray.size != size:
        gray = gray.resize(size, resample=_pil_resample(spec.resize))
    return gray


def gray_to_unit_array(gray: "Image.Image") -> np.ndarray:  # noqa: F821
    """8-bit grayscale image -> float32 CHW array in [0, 1] with the gray channel repeated 3 times."""
    a = np.asarray(gray, dtype=np.float32) / 255.0
    return np.repeat(a[None, :, :], 3, axis=0)


def load_unit_image(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """The whole outside-the-model preprocessing: file -> float32 array (3, H, W) in [0, 1]."""
    return gray_to_unit_array(load_gray_image(path, spec))
