"""What every export command shares: its common flags, one way to find the checkpoint's data, the output
folder checks and the result table. Each `python -m export...` parses, calls one export function with
keywords (see run_cli), and prints what was written."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from export.common import ExportError, require_calibration
from export.manifest import ArtifactEntry, entries, record_source
from export.pipeline import source_record
from quantize.torch_ao import X86_ISA_CHOICES
from train.atomic import check_writable_dir
from train.checkpoint import FORMAT as CHECKPOINT_FORMAT
from train.checkpoint import Checkpoint, training_split
from train.data import DataError, Sample, verification_sets
from train.cpu import fit_torch_threads
from train.memory import keep_freed_memory

log = logging.getLogger(__name__)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt): toolkit format, torchvision state "
                                                      "dict or notebook style")
    add_data_args(p)
    p.add_argument("--out", type=Path, default=Path("artifacts"),
                   help="folder for the artifacts and artifacts.json (default artifacts/)")


def add_data_args(p: argparse.ArgumentParser, calib_size: int = 300, eval_size: int = 100) -> None:
    p.add_argument("--data", type=Path, help="labelled real images: the train split calibrates int8, the val "
                                             "split verifies. Default: the training data the checkpoint "
                                             "records; with neither, static int8 stops and float files are only "
                                             "checked on generated inputs (status 'exported', not 'verified')")
    p.add_argument("--calib-size", type=int, default=calib_size,
                   help=f"train images that calibrate int8 (default {calib_size})")
    p.add_argument("--eval-size", type=int, default=eval_size,
                   help=f"val images each artifact is verified on (default {eval_size})")


def add_x86_isa_arg(p: argparse.ArgumentParser) -> None:
    """For the commands that make server-side x86 int8 (ONNX Runtime static, torch x86)."""
    p.add_argument("--x86-isa", default="auto", choices=X86_ISA_CHOICES,
                   help="x86 CPUs that server-side int8 (ONNX Runtime static, torch x86) must stay exact on: "
                        "avx2 = every x86-64 CPU (saturation-free: 7-bit weights), vnni = only "
                        "CPUs with VNNI/AMX (full 8 bits), auto = this machine (default)")


def variants_option(value: str, choices: Sequence[str], flag: str = "--variants") -> tuple[str, ...]:
    """A comma-separated list of a format's variants, checked against its choices before anything is written."""
    variants = tuple(v.strip() for v in value.split(",") if v.strip())
    if not variants or set(variants) - set(choices):
        raise ExportError(f"{flag} {value!r}: choose from {', '.join(choices)} (comma-separated)")
    return variants


def check_out_dir(out: Path, flag: str = "--out") -> Path:
    """A folder we can write into (train.atomic.check_writable_dir), made if missing."""
    out = check_writable_dir(out, flag)
    out.mkdir(parents=True, exist_ok=True)
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
    """--data, else the training data the checkpoint records (and say so); either way the split training made
    where it is the data the checkpoint was trained on (train.checkpoint.training_split). Static int8 with
    neither stops before anything is written."""
    if data is None:
        data = training_data_of(ckpt)
        if data is not None:
            log.info("no --data: calibrating and verifying on the training data %s recorded in %s", data, ckpt.path)
        elif static_int8:
            require_calibration(None, f"{what} from {ckpt.path}", alternatives)
    return None if data is None else training_split(ckpt, data)


def check_sizes(**sizes: int | None) -> None:
    """Image counts given on the command line must be at least 1 (0 never silently means 'all')."""
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def load_inputs(args: argparse.Namespace, ckpt: Checkpoint, static_int8: bool = False,
                alternatives: str = "choose an int8 mode that needs no calibration") -> tuple[
                    Path | None, list[Sample] | None, list[Sample] | None]:
    """(data folder, eval samples from val, calibration samples from train); raises the toolkit's errors
    before anything is written. Without --data the training data the checkpoint records is used (and said);
    static int8 with neither stops with an error. The image counts are checked by the caller (run_cli), before
    the checkpoint is loaded."""
    data = resolve_data(args.data, ckpt, static_int8, "static int8", alternatives)
    if data is None:
        return None, None, None
    eval_samples, calib_samples = verification_sets(data, ckpt.spec.class_names, args.calib_size, args.eval_size)
    return Path(data), eval_samples, calib_samples


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
    counts = [e.verification["n_images"] for e in rows if e.status == "verified" and e.verification.get("n_images")]
    checked = [e for e in rows if e.status == "verified" and e.verification.get("n_images")
               and e.verification.get("top1_agreement") is not None]
    if checked:  # what the lowest agreement says about images like these, at this many images
        from train.metrics import agreement_interval

        low = min(checked, key=lambda e: e.verification["top1_agreement"])
        n, agree = int(low.verification["n_images"]), float(low.verification["top1_agreement"])
        lo, hi = agreement_interval(round(agree * n), n)
        print(f"note: the lowest top-1 agreement, {agree:.3f} ({low.name}) on {n} real images, has the exact 95% "
              f"interval {lo:.3f}-{hi:.3f} on images like them", file=file)
    if counts and min(counts) < FEW_IMAGES:
        print(f"note: verified on only {min(counts)} real images (all the val split offers, or --eval-size): one "
              f"changed top class moves agreement by 1/{min(counts)}; a val split of {FEW_IMAGES}+ images makes "
              f"'verified' say more", file=file)


FEW_IMAGES = 50  # below this many verification images, a top-1 agreement is a coarse figure


def setup_logging() -> None:
    """INFO for the toolkit, WARNING for the libraries (ONNX Runtime's quantizer logs every tensor at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "quantize", "train", "mobile_assets"):
        logging.getLogger(name).setLevel(logging.INFO)


def run_cli(parser: argparse.ArgumentParser, export: Callable[..., list[ArtifactEntry]],
            argv: Sequence[str] | None, options: Callable[[argparse.Namespace], dict],
            static_int8: Callable[[dict], bool] = lambda opts: False,
            alternatives: str = "choose an int8 mode that needs no calibration") -> int:
    """Parse, check every input (static int8 needs real calibration images), call one export function with
    keywords, print a table. Exit 2 on bad input (before anything is written), 1 when an artifact failed."""
    from train.checkpoint import load_checkpoint

    args = parser.parse_args(argv)
    setup_logging()
    keep_freed_memory()
    fit_torch_threads()
    opts = options(args)
    check_sizes(calib_size=args.calib_size, eval_size=args.eval_size)
    check_writable_dir(args.out)  # before decoding the data and loading the model
    ckpt = load_checkpoint(args.checkpoint)
    data, eval_samples, calib_samples = load_inputs(args, ckpt, static_int8(opts), alternatives)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # probed by check_writable_dir above
    record_source(args.out, source_record(ckpt, data, eval_samples))
    rows = export(ckpt, args.out, eval_samples=eval_samples, calib_samples=calib_samples, **opts)
    print_entries(rows)
    _warn_other_checkpoints(Path(args.out), ckpt, {e.name for e in rows})
    return 1 if any(e.status == "failed" for e in rows) else 0


def _warn_other_checkpoints(out: Path, ckpt: Checkpoint, exported: set[str]) -> None:
    """A subset of formats exported into a folder holding another checkpoint's export: its other rows stay, while
    the folder's source block (spec, verification images) now describes this checkpoint."""
    other = [e.name for e in entries(out) if e.name not in exported and e.source_checkpoint_sha256 != ckpt.sha256]
    if other:
        log.warning("%s/artifacts.json also lists %d file(s) exported from another checkpoint (%s); the benchmark "
                    "notes them and the bundle skips them. Export every format again, or use another --out",
                    out, len(other), ", ".join(other))

