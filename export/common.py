"""What every exporter shares: inputs and their origin, the float reference, the proofs, the statuses,
manifest entries and the CLI.

Each format module stays a short pipeline (build -> write under a temporary name -> prove -> rename ->
record); everything around that pipeline lives here so the formats behave the same way, and 'verified'
is decided in one place (status_for).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export.manifest import ArtifactEntry, record
from quantize.targets import MIN_TOP1_AGREEMENT
from quantize.torch_ao import X86_ISA_CHOICES
from train.atomic import atomic_path, sha256_file, size_bytes
from train.checkpoint import FORMAT as CHECKPOINT_FORMAT
from train.checkpoint import Checkpoint
from train.data import Sample, images_origin, load_batch
from train.errors import ToolkitError

log = logging.getLogger(__name__)

FLOAT_ATOL = 1e-4           # float artifacts must reproduce the PyTorch logits this closely
GENERATED_EVAL = 8          # random inputs used when no --data is given
TOOLS = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "coremltools", "executorch", "torchao")


class ExportError(ToolkitError, RuntimeError):
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


@dataclass(frozen=True)
class InputSet:
    """What an artifact was checked on: the images, a description, and where they came from.

    origin: 'real' (images from --data that the toolkit did not make), 'synthetic' (a dataset that
    train.synthetic generated) or 'generated' (seeded noise, when no --data was given). Only 'real'
    makes an artifact 'verified' (see status_for)."""

    x: np.ndarray
    description: str
    origin: str


def eval_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None, n: int = GENERATED_EVAL,
                seed: int = 0) -> InputSet:
    """Real images when given (the proof that matters), else seeded grayscale noise in [0, 1]
    (three equal channels, like every real input after `load_unit_image`): a numerics check only."""
    if samples:
        origin = images_origin(samples)
        label = "real images (val split)" if origin == "real" else "SYNTHETIC images (val split)"
        return InputSet(load_batch(list(samples), ckpt.spec), f"{len(samples)} {label}", origin)
    size = ckpt.spec.input_size
    gray = np.random.default_rng(seed).integers(0, 256, (n, 1, size, size)).astype(np.float32) / 255.0
    return InputSet(np.repeat(gray, 3, axis=1), f"{n} GENERATED random inputs in [0, 1] (no --data given; "
                    f"a numerics check, not a verification)", "generated")


def require_calibration(calib_samples: Sequence[Sample] | None, what: str, alternatives: str) -> None:
    """Static int8 is calibrated on images from a train split, never on generated inputs: int8
    calibrated on noise lost 6 accuracy points on real X-rays while agreeing 100% on the noise."""
    if not calib_samples:
        raise ExportError(f"{what} needs real calibration images: pass --data with a train split (or train "
                          f"with `python -m train --data ...`, whose checkpoint records its data), or {alternatives}")


def calib_inputs_note(samples: Sequence[Sample] | None) -> str:
    """How the calibration set is described in manifests and reports."""
    require_calibration(samples, "static int8", "export without static int8")
    origin = images_origin(samples)
    return f"{len(samples)} {'images' if origin == 'real' else 'SYNTHETIC images'} from the train split"


def calib_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None) -> tuple[np.ndarray, str]:
    """Train-split images for static int8; raises ExportError without them (see require_calibration)."""
    note = calib_inputs_note(samples)  # raises without samples
    return load_batch(list(samples), ckpt.spec), note


def reference_logits(ckpt: Checkpoint, x: np.ndarray) -> np.ndarray:
    """The float PyTorch model's logits, through the same runner code path as the benchmarks."""
    from export.runners import EagerRunner

    return EagerRunner().use_module(ckpt.build_deploy_model()).run(x)


def check_logits(out: np.ndarray, n: int, classes: int, what: str) -> None:
    if out.shape != (n, classes) or not np.isfinite(out).all():
        raise ExportError(f"{what}: output shape {out.shape} (expected {(n, classes)}) or non-finite values")


def checked_on(inputs: InputSet, runtime: str, engine: str | None) -> dict[str, Any]:
    """Where a check ran: inputs and their origin, the CPU and its int8 features, the engine or provider."""
    from train.cpu import cpu_description

    return {"inputs": inputs.description, "inputs_origin": inputs.origin, "n_images": int(len(inputs.x)),
            "runtime": runtime, "engine": engine, "machine": cpu_description()}


def float_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: InputSet, tol: float = FLOAT_ATOL,
                note: str | None = None, engine: str | None = None) -> dict[str, Any]:
    """Float artifacts: the logits must match the PyTorch model within `tol`, or the artifact is refused."""
    from export.runners import compare_logits

    check_logits(out, len(ref), ref.shape[1], runtime)
    cmp = compare_logits(ref, out)
    if not cmp["max_abs_logit_diff"] <= tol:
        raise ExportError(f"{runtime} logits differ from the PyTorch model by {cmp['max_abs_logit_diff']:.3g} "
                          f"> {tol} on {inputs.description}")
    v = {"method": f"executed in {runtime}, compared with the float PyTorch model",
         **checked_on(inputs, runtime, engine), "tolerance": tol, "passed": True, **cmp}
    return {**v, "tolerance_note": note} if note else v


def int8_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: InputSet,
               engine: str | None = None) -> dict[str, Any]:
    """int8 artifacts are not held to the float tolerance: they must run and give finite logits; the
    agreement with the float model is measured and recorded with the target; the quantization report and
    the benchmark judge it on the whole val split (on the 100 images here one flip is already 1%)."""
    from export.runners import compare_logits

    check_logits(out, len(ref), ref.shape[1], runtime)
    cmp = compare_logits(ref, out)
    return {"method": f"executed in {runtime}, compared with the float PyTorch model",
            **checked_on(inputs, runtime, engine), "tolerance": None, "passed": True,
            "criterion": "runs and gives finite logits; top-1 agreement recorded against the target",
            "agreement_target": MIN_TOP1_AGREEMENT, **cmp}


def status_for(verification: dict[str, Any]) -> tuple[str, str | None]:
    """'verified' only for a check on real images; anything else is 'exported', with the reason."""
    origin = verification.get("inputs_origin")
    if verification.get("executed") is False:
        return "exported", (f"not executed in its own runtime here ({verification.get('method')}); it counts as "
                            f"verified only where that runtime runs it")
    if origin == "real":
        return "verified", None
    if origin == "synthetic":
        return "exported", ("checked on SYNTHETIC images that the toolkit generated, not on real X-rays: "
                            "export again with --data pointing at real images to verify it")
    return "exported", ("numerics check on GENERATED inputs only (no --data): it runs and matches the PyTorch "
                        "model there, but it is not verified on real images; export with --data to verify it")


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
        status, reason = status_for(verification)
        entry = ArtifactEntry(**common, path=file, status=status, status_reason=reason, sha256=sha256_file(dest),
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
    p.add_argument("--data", type=Path, help="labelled real images: the train split calibrates int8, the val "
                                             "split verifies. Default: the training data the checkpoint "
                                             "records; with neither, static int8 stops and float files are only "
                                             "checked on generated inputs (status 'exported', not 'verified')")
    p.add_argument("--out", type=Path, default=Path("artifacts"),
                   help="folder for the artifacts and artifacts.json (default artifacts/)")
    p.add_argument("--calib-size", type=int, default=300, help="train images that calibrate int8 (default 300)")
    p.add_argument("--eval-size", type=int, default=100, help="val images each artifact is verified on (default 100)")


def add_x86_isa_arg(p: argparse.ArgumentParser) -> None:
    """For the commands that make server-side x86 int8 (ONNX Runtime static, torch x86)."""
    p.add_argument("--x86-isa", default="auto", choices=X86_ISA_CHOICES,
                   help="x86 CPUs that server-side int8 (ONNX Runtime static, torch x86) must stay exact on: "
                        "avx2 = every x86-64 CPU (saturation-free: 7-bit weights), vnni = only "
                        "CPUs with VNNI/AMX (full 8 bits), auto = this machine (default)")


def refuse_file(out: Path, flag: str = "--out") -> None:
    """An output folder whose place a file takes is a user error, found before any work or writing."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ExportError(f"{flag} {out} is a file; pass a folder (it is created if missing)")


def check_out_dir(out: Path, flag: str = "--out") -> Path:
    """A folder we can write into, made if missing; a file in its place, or no permission, is a user error,
    not a traceback."""
    import tempfile

    out = Path(out)
    refuse_file(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ExportError(f"{flag} {out}: cannot write there ({err.strerror or err}); choose a writable "
                          f"folder") from err
    return out


def training_data_of(ckpt: Checkpoint) -> Path | None:
    """The data a toolkit checkpoint was trained on, when it still exists: the run's splits.csv (the exact
    split training used) or the recorded --data folder."""
    splits = Path(ckpt.path).parent / "splits.csv"
    if ckpt.source_format == CHECKPOINT_FORMAT and splits.is_file():
        return splits
    recorded = (ckpt.meta.get("train_config") or {}).get("data")
    return Path(recorded) if recorded and Path(recorded).exists() else None


def resolve_data(data: Path | None, ckpt: Checkpoint, static_int8: bool, what: str, alternatives: str) -> Path | None:
    """--data, else the training data the checkpoint records (and say so); static int8 with neither stops
    before anything is written."""
    if data is None:
        data = training_data_of(ckpt)
        if data is not None:
            log.info("no --data: calibrating and verifying on the training data %s recorded in %s", data, ckpt.path)
        elif static_int8:
            require_calibration(None, f"{what} from {ckpt.path}", alternatives)
    return data


def train_val(data: Path, ckpt: Checkpoint) -> tuple[list[Sample], list[Sample]]:
    """(train split, val split, or test where there is no val) of --data, in the checkpoint's class order."""
    from train.data import DataError, assign_splits, discover

    idx = discover(data, ckpt.spec.class_names)
    idx = idx if idx.has_split else assign_splits(idx)  # same seeded split `python -m train` makes by default
    train, val = idx.split("train"), idx.split("val") or idx.split("test")
    if not train or not val:
        raise DataError(f"--data {data}: needs train and val images (found {len(train)} train, {len(val)} val)")
    return train, val


def split_samples(train: Sequence[Sample], val: Sequence[Sample], calib_size: int,
                  eval_size: int) -> tuple[list[Sample], list[Sample]]:
    """(val subset that verifies, train subset that calibrates): one seed each, the same for every command."""
    from train.data import seeded_subset

    return seeded_subset(val, eval_size, seed=1), seeded_subset(train, calib_size, seed=0)


def load_inputs(args: argparse.Namespace, static_int8: bool = False,
                alternatives: str = "choose an int8 mode that needs no calibration") -> tuple[
                    Checkpoint, list[Sample] | None, list[Sample] | None]:
    """(checkpoint, eval samples from val, calibration samples from train); raises the toolkit's errors
    before anything is written. Without --data the training data the checkpoint records is used (and said);
    static int8 with neither stops with an error."""
    from train.checkpoint import load_checkpoint
    from train.data import DataError

    for flag, value in (("--calib-size", args.calib_size), ("--eval-size", args.eval_size)):
        if value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    refuse_file(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    data = resolve_data(args.data, ckpt, static_int8, "static int8", alternatives)
    if data is None:
        return ckpt, None, None
    eval_samples, calib_samples = split_samples(*train_val(Path(data), ckpt), args.calib_size, args.eval_size)
    return ckpt, eval_samples, calib_samples


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
    reasons = sorted({e.status_reason for e in rows if e.status == "exported" and e.status_reason})
    for reason in reasons:
        print(f"note: 'exported', not 'verified': {reason}", file=file)


def setup_logging() -> None:
    """INFO for the toolkit, WARNING for the libraries (ONNX Runtime's quantizer logs every tensor at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "quantize", "train"):
        logging.getLogger(name).setLevel(logging.INFO)


def run_cli(parser: argparse.ArgumentParser, export: Callable[..., list[ArtifactEntry]],
            argv: Sequence[str] | None, options: Callable[[argparse.Namespace], dict],
            static_int8: Callable[[dict], bool] = lambda opts: False,
            alternatives: str = "choose an int8 mode that needs no calibration") -> int:
    """Parse, check every input (static int8 needs real calibration images), call one export function with
    keywords, print a table. Exit 2 on bad input (before anything is written), 1 when an artifact failed."""
    args = parser.parse_args(argv)
    setup_logging()
    opts = options(args)
    ckpt, eval_samples, calib_samples = load_inputs(args, static_int8(opts), alternatives)
    check_out_dir(args.out)
    rows = export(ckpt, args.out, eval_samples=eval_samples, calib_samples=calib_samples, **opts)
    print_entries(rows)
    return 1 if any(e.status == "failed" for e in rows) else 0
