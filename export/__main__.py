"""`python -m export`: every registered format (ONNX, CoreML, ExecuTorch, TorchScript Lite, TorchScript,
TorchServe), each verified in its own runtime and recorded in <out>/artifacts.json; a format that fails
is a 'failed' row with the reason, and the others still export."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from export.cli import add_common_args, add_x86_isa_arg, run_cli
from export.manifest import read_manifest
from export.parallel import resolve_jobs
from export.pipeline import export_all, format_options, timing_table
from export.registry import FORMATS, INT8_CHOICES, RegistryError, get_format
from train.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                epilog="formats: " + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values()))
    add_common_args(p)
    add_x86_isa_arg(p)
    p.add_argument("--formats", default="all",
                   help=f"comma-separated formats to export, from {', '.join(FORMATS)} (default: all)")
    p.add_argument("--int8", default="static", choices=INT8_CHOICES,
                   help="int8 variants: static (default; calibrated on real train images: needs --data or a "
                        "checkpoint that records its data), dynamic (only those that need no calibration), none")
    p.add_argument("--jobs", default="auto", type=_jobs,
                   help="formats exported side by side in worker processes, each with its share of the cores "
                        "(default auto: one per core; 1 = one after another in this process)")
    return p


def _jobs(value: str) -> str | int:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--jobs takes 'auto' or a whole number >= 1, got {value!r}")
    return int(value)


def _formats(value: str) -> list[str]:
    names = list(FORMATS) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    if not names:  # nothing to do would still rewrite artifacts.json's source block and exit 0
        raise RegistryError(f"--formats {value!r} names no format; choose from all, {', '.join(FORMATS)}")
    for name in names:
        get_format(name)  # names the flag and lists the registered formats
    return list(dict.fromkeys(names))  # a format named twice is exported once, not by two workers at once


def _options(args: argparse.Namespace) -> dict:
    names = _formats(args.formats)
    return {"only": names, "options": format_options(names, args.int8, x86_isa=args.x86_isa),
            "static": any(FORMATS[n].calibrates(args.int8) for n in names), "jobs": resolve_jobs(args.jobs, len(names))}


def _export(ckpt, out, *, eval_samples, calib_samples, only, options, static, jobs):
    rows = export_all(ckpt, out, eval_samples=eval_samples, calib_samples=calib_samples, only=only, options=options,
                      jobs=jobs)
    manifest = read_manifest(out)
    print(timing_table(manifest["export_timing_s"], manifest.get("export_run")))
    return rows


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _export, argv, _options, static_int8=lambda o: o["static"],
                   alternatives="pass --int8 dynamic or --int8 none")


if __name__ == "__main__":
    sys.exit(main())
