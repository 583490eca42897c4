"""What the ONNX, CoreML and ExecuTorch exporters share: inputs, the float reference, entries, the CLI.

Each format module stays a short pipeline (build -> write under a temporary name -> prove -> rename ->
record); everything around that pipeline lives here so the three behave the same way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export.manifest import ArtifactEntry, record
from train.atomic import atomic_path, sha256_file, size_bytes
from train.checkpoint import Checkpoint
from train.data import Sample, load_batch

log = logging.getLogger(__name__)

FLOAT_ATOL = 1e-4           # float artifacts must reproduce the PyTorch logits this closely
GENERATED_EVAL = 8          # random inputs used when no --data is given
GENERATED_CALIB_PER_CLASS = 8
TOOLS = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "coremltools", "executorch", "torchao")


class ExportError(RuntimeError):
    """An export that cannot be done as asked, or an artifact that failed its proof."""


def tool_versions(names: Sequence[str] = TOOLS) -> dict[str, str]:
    """Installed versions from package metadata: no heavy import just to learn a version."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def eval_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None, n: int = GENERATED_EVAL,
                seed: int = 0) -> tuple[np.ndarray, str]:
    """Real images when given (the proof that matters), else seeded grayscale noise in [0, 1]
    (three equal channels, like every real input after `load_unit_image`)."""
    if samples:
        return load_batch(list(samples), ckpt.spec), f"{len(samples)} real images (val split)"
    size = ckpt.spec.input_size
    gray = np.random.default_rng(seed).integers(0, 256, (n, 1, size, size)).astype(np.float32) / 255.0
    return np.repeat(gray, 3, axis=1), f"{n} GENERATED random inputs in [0, 1] (no --data given)"


def calib_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None) -> tuple[np.ndarray, str]:
    """Train-split images when given; else SYNTHETIC images so the command still runs (and says so)."""
    if samples:
        return load_batch(list(samples), ckpt.spec), f"{len(samples)} images from the train split"
    from train.data import discover
    from train.synthetic import make_synthetic_dataset

    log.warning("no calibration images given: calibrating int8 on SYNTHETIC images; pass --data for a real model")
    with tempfile.TemporaryDirectory(prefix="cxr-calib-") as tmp:
        root = make_synthetic_dataset(Path(tmp) / "calib", per_class=GENERATED_CALIB_PER_CLASS,
                                      size=ckpt.spec.input_size, seed=1, classes=ckpt.spec.class_names)
        x = load_batch(discover(root, ckpt.spec.class_names).samples, ckpt.spec)
    return x, f"{len(x)} SYNTHETIC generated images (no --data given; not representative)"


def reference_logits(ckpt: Checkpoint, x: np.ndarray) -> np.ndarray:
    """The float PyTorch model's logits, through the same runner code path as the benchmarks."""
    from export.runners import EagerRunner

    return EagerRunner().use_module(ckpt.build_deploy_model()).run(x)


def check_logits(out: np.ndarray, n: int, classes: int, what: str) -> None:
    if out.shape != (n, classes) or not np.isfinite(out).all():
        raise ExportError(f"{what}: output shape {out.shape} (expected {(n, classes)}) or non-finite values")


def float_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: str, tol: float = FLOAT_ATOL,
                note: str | None = None) -> dict[str, Any]:
    """Float artifacts: the logits must match the PyTorch model within `tol`, or the artifact is refused."""
    from export.runners import compare_logits

    check_logits(out, len(ref), ref.shape[1], runtime)
    cmp = compare_logits(ref, out)
    if not cmp["max_abs_logit_diff"] <= tol:
        raise ExportError(f"{runtime} logits differ from the PyTorch model by {cmp['max_abs_logit_diff']:.3g} "
                          f"> {tol} on {inputs}")
    v = {"method": f"executed in {runtime}, compared with the float PyTorch model", "inputs": inputs,
         "tolerance": tol, "passed": True, **cmp}
    return {**v, "tolerance_note": note} if note else v


def int8_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: str) -> dict[str, Any]:
    """int8 artifacts are not held to the float tolerance: they must run and give finite logits; the
    agreement with the float model is measured and recorded (the quantization report judges accuracy)."""
    from export.runners import compare_logits

    check_logits(out, len(ref), ref.shape[1], runtime)
    return {"method": f"executed in {runtime}, compared with the float PyTorch model", "inputs": inputs,
            "tolerance": None, "passed": True,
            "criterion": "runs and gives finite logits; agreement recorded, not thresholded", **compare_logits(ref, out)}


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_proven(ckpt: Checkpoint, out_dir: Path, *, name: str, file: str, fmt: str, precision: str,
                 runtime: str, write: Callable[[Path], dict], prove: Callable[[Path], dict],
                 engine: str | None = None, details: dict | None = None) -> ArtifactEntry:
    """Write to a temporary name, prove it, rename; on any failure leave no file and record 'failed'."""
    dest = Path(out_dir) / file
    details = dict(details or {})
    common = dict(name=name, format=fmt, precision=precision, runtime=runtime, engine=engine,
                  source_checkpoint_sha256=ckpt.sha256, tool_versions=tool_versions())
    try:
        with atomic_path(dest) as tmp:
            details.update(write(tmp) or {})
            verification = prove(tmp)
        entry = ArtifactEntry(**common, path=file, status="verified", sha256=sha256_file(dest),
                              size_bytes=size_bytes(dest), verification=verification, details=details)
    except Exception as err:  # any failure is a 'failed' row, never a crash of the whole export
        remove_path(dest)  # a stale file from an earlier run must not pass for this one
        log.error("%s failed: %s: %s", name, type(err).__name__, err)
        entry = failed_entry(ckpt, name=name, fmt=fmt, precision=precision, runtime=runtime, engine=engine,
                             error=f"{type(err).__name__}: {err}", details=details)
    record(out_dir, entry)
    return entry


def failed_entry(ckpt: Checkpoint | None, *, name: str, fmt: str, precision: str, runtime: str, error: str,
                 engine: str | None = None, details: dict | None = None) -> ArtifactEntry:
    return ArtifactEntry(name=name, format=fmt, precision=precision, runtime=runtime, path=None,
                         status="failed", engine=engine, source_checkpoint_sha256=ckpt.sha256 if ckpt else None,
                         tool_versions=tool_versions(), details=dict(details or {}), error=error)


# ----------------------------------------------------------------------------------------------- CLI
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt): toolkit format, torchvision state "
                                                      "dict or notebook style")
    p.add_argument("--data", type=Path, help="labelled images: the train split calibrates int8, the val split "
                                             "verifies (default: generated inputs, labelled as such)")
    p.add_argument("--out", type=Path, default=Path("artifacts"),
                   help="folder for the artifacts and artifacts.json (default artifacts/)")
    p.add_argument("--calib-size", type=int, default=300, help="train images that calibrate int8 (default 300)")
    p.add_argument("--eval-size", type=int, default=100, help="val images each artifact is verified on (default 100)")


def load_inputs(args: argparse.Namespace) -> tuple[Checkpoint, list[Sample] | None, list[Sample] | None]:
    """(checkpoint, eval samples from val, calibration samples from train); raises the toolkit's errors."""
    from train.checkpoint import load_checkpoint
    from train.data import DataError, assign_splits, discover, seeded_subset

    for flag, value in (("--calib-size", args.calib_size), ("--eval-size", args.eval_size)):
        if value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    ckpt = load_checkpoint(args.checkpoint)
    if args.data is None:
        return ckpt, None, None
    idx = discover(args.data, ckpt.spec.class_names)
    idx = idx if idx.has_split else assign_splits(idx)  # same seeded split `python -m train` makes by default
    train, val = idx.split("train"), idx.split("val") or idx.split("test")
    if not train or not val:
        raise DataError(f"--data {args.data}: needs train and val images (found {len(train)} train, "
                        f"{len(val)} val)")
    return ckpt, seeded_subset(val, args.eval_size, seed=1), seeded_subset(train, args.calib_size, seed=0)


def print_entries(rows: Sequence[ArtifactEntry], file: Any = None) -> None:
    file = file or sys.stdout  # looked up now, so redirected stdout (tests, tee) is honoured
    for e in rows:
        v = e.verification
        if e.status == "failed":
            print(f"{e.name:18s} failed    {e.error}", file=file)
            continue
        size = f"{e.size_bytes / 1e6:7.2f} MB" if e.size_bytes is not None else "      - MB"
        print(f"{e.name:18s} {e.status:9s} {e.path or '-':26s} {size}  "
              f"max|dlogit| {v.get('max_abs_logit_diff', float('nan')):.2e}  "
              f"top-1 agreement {v.get('top1_agreement', float('nan')):.3f}", file=file)


def setup_logging() -> None:
    """INFO for the toolkit, WARNING for the libraries (ONNX Runtime's quantizer logs every tensor at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "quantize", "train"):
        logging.getLogger(name).setLevel(logging.INFO)


def run_cli(parser: argparse.ArgumentParser, export: Callable[..., list[ArtifactEntry]],
            argv: Sequence[str] | None, options: Callable[[argparse.Namespace], dict]) -> int:
    """Parse, load inputs, call one export function with keywords, print a table. Exit 2 on bad input,
    1 when an artifact failed."""
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.spec import SpecError

    args = parser.parse_args(argv)
    setup_logging()
    try:
        ckpt, eval_samples, calib_samples = load_inputs(args)
        rows = export(ckpt, args.out, eval_samples=eval_samples, calib_samples=calib_samples, **options(args))
    except (CheckpointError, DataError, SpecError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_entries(rows)
    return 1 if any(e.status == "failed" for e in rows) else 0
