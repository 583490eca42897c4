"""The command line of `python -m export.lite`: parse, resolve checkpoint and data, export, prove, bundle."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from export.lite import INT8_MODES, LiteExportError, check_bytecode_version, export_lite, export_torchscript
from quantize.torch_ao import X86_ISA_CHOICES
from train.checkpoint import Checkpoint
from train.errors import cli_errors

log = logging.getLogger(__name__)


def _resolve_checkpoint(checkpoint: str | None, runs_dir: Path) -> Path:
    from train.checkpoint import CheckpointError, find_latest_checkpoint

    if checkpoint:
        return Path(checkpoint)
    found = find_latest_checkpoint(runs_dir)
    if found is None:
        raise CheckpointError(f"no --checkpoint given and no checkpoint under {runs_dir}/; train one with "
                              f"`python -m train` or pass --checkpoint PATH")
    log.info("no --checkpoint given: using the newest training checkpoint %s", found)
    return found


def _data_splits(data: Path, ckpt: Checkpoint, calib_size: int, verify_size: int, eval_size: int | None):
    """(calibration: train split, verification subset, metrics set) from --data, in the checkpoint's class
    order; the verification subset is the one `python -m export` uses (export.common.split_samples)."""
    from export.common import split_samples, train_val
    from train.data import seeded_subset

    train, val = train_val(data, ckpt)
    verify, calib = split_samples(train, val, calib_size, verify_size)
    metrics = val if eval_size is None else seeded_subset(val, eval_size, seed=1)
    return calib, verify, metrics


def run_lite(*, checkpoint: str | None, out: Path, artifacts: Path, int8: str, engine: str,
             bytecode_version: int | None, data: Path | None, calib_size: int, verify_size: int,
             eval_size: int | None, force: bool, classes: list[str] | None, input_size: int | None,
             torchscript: bool, bundle: bool, test_vectors: int, model_name: str | None,
             model_version: str | None, x86_isa: str = "auto", runs_dir: Path = Path("runs")) -> int:
    """The whole command: export and prove the .ptl files, then write the bundle. Returns the exit code."""
    from export.bundle import _check_target, write_bundle
    from export.common import check_out_dir, print_entries, resolve_data
    from train.data import images_origin
    from quantize.torch_ao import check_engine, resolve_x86_isa
    from train.checkpoint import load_checkpoint
    from train.spec import PreprocessSpec

    check_bytecode_version(bytecode_version)
    if int8 != "none":
        check_engine(engine)
        resolve_x86_isa(x86_isa)
    spec = PreprocessSpec().with_overrides(class_names=tuple(classes) if classes else None,
                                           input_size=input_size) if (classes or input_size) else None
    ckpt = load_checkpoint(_resolve_checkpoint(checkpoint, runs_dir), spec)
    calib = verify = metrics = None
    data = resolve_data(data, ckpt, int8 == "static", "static int8 (model_int8.ptl)",
                        "pass --int8 dynamic or --int8 none")
    if data is not None:
        calib, verify, metrics = _data_splits(data, ckpt, calib_size, verify_size, eval_size)
    if bundle and images_origin(verify) != "real":
        raise LiteExportError("the Flutter bundle ships only models verified on real images: pass --data with real "
                              "X-rays" + (" (these are SYNTHETIC)" if verify else "") + ", or --no-bundle to only "
                              "export")
    if bundle:
        _check_target(out, force)  # fail before minutes of export, not after
    check_out_dir(artifacts, "--artifacts")
    results = export_lite(ckpt, artifacts, eval_samples=verify, calib_samples=calib, int8=int8, engine=engine,
                          bytecode_version=bytecode_version, x86_isa=x86_isa)
    if torchscript:
        results += export_torchscript(ckpt, artifacts, eval_samples=verify)
    print_entries(results)
    if any(e.status == "failed" for e in results):
        print(f"error: an export failed its proof; nothing was bundled (see {artifacts}/artifacts.json)",
              file=sys.stderr)
        return 1
    if bundle:
        names = ["ptl_fp32", "executorch_fp32", "executorch_int8"] + (["ptl_int8"] if int8 != "none" else [])
        write_bundle(artifacts, out, ckpt, eval_samples=verify, force=force, include=names,
                     test_vectors=test_vectors, model_name=model_name, model_version=model_version,
                     metrics_samples=metrics, eval_info={"data": str(data), "split": "val"} if data else None)
        print(f"Flutter bundle written to {out}/ (manifest.json, labels.txt, test_vectors/, README.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.lite", description=(
        "TorchScript Lite (.ptl) models for PyTorch Mobile, proven in the lite interpreter, and the Flutter "
        "asset bundle (models, labels.txt, manifest.json, test_vectors/, README.md)."))
    p.add_argument("--checkpoint", help="checkpoint (.pt): toolkit format, torchvision state dict or notebook "
                                        "style (default: newest runs/**/best.pt)")
    p.add_argument("--out", type=Path, default=Path("mobile_assets"), help="Flutter bundle folder (default mobile_assets/)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="where model.ptl, model_int8.ptl, model.torchscript.pt and artifacts.json go (default artifacts/)")
    p.add_argument("--int8", choices=INT8_MODES, default="static",
                   help="int8 model: static (calibrated, all convs int8), dynamic (Linear only), none")
    p.add_argument("--engine", default="qnnpack", help="quantized engine the int8 model is built for "
                                                        "(qnnpack = ARM phones; x86/fbgemm/onednn also exist)")
    p.add_argument("--x86-isa", default="auto", choices=X86_ISA_CHOICES,
                   help="only with --engine x86/fbgemm/onednn: x86 CPUs the int8 model must stay exact on (avx2 = "
                        "every x86-64 CPU, 7-bit weights; vnni = CPUs with VNNI/AMX; auto = this machine)")
    p.add_argument("--bytecode-version", type=int, help="write this lite-interpreter bytecode version for older "
                                                        "app runtimes (e.g. 7); default: what this torch writes")
    p.add_argument("--data", type=Path, help="labelled real images: train split calibrates int8, val split verifies, "
                                             "evaluates and gives test vectors (default: the training data the "
                                             "checkpoint records; static int8 stops without either)")
    p.add_argument("--calib-size", type=int, default=256, help="train images used to calibrate int8 (default 256)")
    p.add_argument("--verify-size", type=int, default=32, help="val images for the lite-interpreter proof (default 32)")
    p.add_argument("--eval-size", type=int, help="val images for the bundle's metrics (default: the whole val split)")
    p.add_argument("--test-vectors", type=int, default=3, help="test vectors in the bundle (default 3)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--no-bundle", dest="bundle", action="store_false", help="only export and prove the models")
    p.add_argument("--no-torchscript", dest="torchscript", action="store_false",
                   help="skip model.torchscript.pt (full TorchScript for TorchServe and benchmarks)")
    p.add_argument("--classes", nargs="+", help="class names in output order (only for foreign weights "
                                                "without a stored spec)")
    p.add_argument("--input-size", type=int, help="input size (only for foreign weights without a stored spec)")
    p.add_argument("--model-name", help="model name in manifest.json (default cxr-resnet18-<N>class)")
    p.add_argument("--model-version", help="model version in manifest.json (default: checkpoint sha256 prefix)")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, value in (("--calib-size", a.calib_size), ("--verify-size", a.verify_size),
                        ("--eval-size", a.eval_size), ("--test-vectors", a.test_vectors)):
        if value is not None and value < 1:
            raise LiteExportError(f"{flag} must be at least 1, got {value}")
    return run_lite(**vars(a))
