"""`python -m export.lite`: the lite formats (export.registry: lite, and torchscript unless --no-torchscript)
through the same pipeline, inputs and tolerances as `python -m export`, then the Flutter asset bundle
(`python -m mobile_assets`) from the artifacts.json they were recorded in."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from export.cli import (add_data_args, check_out_dir, check_sizes, print_entries, resolve_data, setup_logging)
from export.common import ExportError
from export.registry import bundle_variants, format_of
from export.torchscript import INT8_MODES, check_bytecode_version
from quantize.torch_ao import X86_ISA_CHOICES
from train.cpu import fit_torch_threads
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


def _bundle_names(ran: Sequence[str], written: Sequence[str]) -> list[str]:
    """Bundled files: those this run wrote, and those of other formats already verified in the folder
    (e.g. ExecuTorch from `python -m export`); never a file of a format this run made but skipped."""
    return [n for n in bundle_variants() if n in written or format_of(n).name not in ran]


def run_lite(a: argparse.Namespace) -> int:
    """The whole command: export and prove the lite files, then write the bundle. Returns the exit code."""
    from export.pipeline import export_all, source_record
    from export.manifest import record_source
    from mobile_assets.bundle import check_target, write_bundle
    from quantize.torch_ao import check_engine, resolve_x86_isa
    from train.checkpoint import load_checkpoint
    from train.data import images_origin, verification_sets
    from train.spec import PreprocessSpec

    check_bytecode_version(a.bytecode_version)
    if a.int8 != "none":
        check_engine(a.engine)
        resolve_x86_isa(a.x86_isa)
    spec = PreprocessSpec().with_overrides(class_names=tuple(a.classes) if a.classes else None,
                                           input_size=a.input_size) if (a.classes or a.input_size) else None
    ckpt = load_checkpoint(_resolve_checkpoint(a.checkpoint, a.runs_dir), spec)
    data = resolve_data(a.data, ckpt, a.int8 == "static", "static int8 (model_int8.ptl)",
                        "pass --int8 dynamic or --int8 none")
    verify = calib = None
    if data is not None:
        verify, calib = verification_sets(data, ckpt.spec.class_names, a.calib_size, a.eval_size)
    if a.bundle and images_origin(verify) != "real":
        raise ExportError("the Flutter bundle ships only models verified on real images: pass --data with real "
                          "X-rays" + (" (these are SYNTHETIC)" if verify else "") + ", or --no-bundle to only "
                          "export")
    if a.bundle:
        check_target(a.out, a.force, a.artifacts)  # fail before minutes of export, not after
    check_out_dir(a.artifacts, "--artifacts")
    record_source(a.artifacts, source_record(ckpt, data, verify))
    ran = ["lite"] + (["torchscript"] if a.torchscript else [])
    options = {"lite": {"int8": a.int8, "engine": a.engine, "bytecode_version": a.bytecode_version,
                        "x86_isa": a.x86_isa}}
    results = export_all(ckpt, a.artifacts, eval_samples=verify, calib_samples=calib, only=ran, options=options)
    print_entries(results)
    if any(e.status == "failed" for e in results):
        print(f"error: an export failed (the table above says why); nothing was bundled (see "
              f"{a.artifacts}/artifacts.json)", file=sys.stderr)
        return 1
    if a.bundle:
        write_bundle(a.artifacts, a.out, data=data, force=a.force, test_vectors=a.test_vectors,
                     include=_bundle_names(ran, [e.name for e in results]), model_name=a.model_name,
                     model_version=a.model_version, metrics_size=a.metrics_size)
        print(f"Flutter bundle written to {a.out}/ (manifest.json, labels.txt, test_vectors/, README.md)")
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
    add_data_args(p)
    p.add_argument("--verify-size", dest="eval_size", type=int, help=argparse.SUPPRESS)  # the old name of --eval-size
    p.add_argument("--metrics-size", type=int, help="val images the bundled models are scored on (default: the "
                                                    "whole val split)")
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
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help=argparse.SUPPRESS)
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging()
    fit_torch_threads()
    check_sizes(calib_size=a.calib_size, eval_size=a.eval_size, metrics_size=a.metrics_size,
                test_vectors=a.test_vectors)
    return run_lite(a)


if __name__ == "__main__":
    sys.exit(main())
