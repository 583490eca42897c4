"""`python -m export`: every registered format (ONNX, CoreML, ExecuTorch, TorchScript Lite, TorchScript,
TorchServe), each verified in its own runtime and recorded in <out>/artifacts.json; a format that fails
is a 'failed' row with the reason, and the others still export."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from export.common import add_common_args, add_x86_isa_arg, run_cli
from export.formats import FORMATS, export_all
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
    return p


INT8_CHOICES = ("static", "dynamic", "none")
# what each --int8 choice asks of the formats that have int8 variants
INT8_OPTIONS = {
    "static": {"onnx": {"int8": ("dynamic", "static")}, "executorch": {"variants": ("fp32", "int8")},
               "lite": {"int8": "static"}},
    "dynamic": {"onnx": {"int8": ("dynamic",)}, "executorch": {"variants": ("fp32",)}, "lite": {"int8": "dynamic"}},
    "none": {"onnx": {"int8": ()}, "executorch": {"variants": ("fp32",)}, "lite": {"int8": "none"}},
}
STATIC_FORMATS = ("onnx", "executorch", "lite")


def _formats(value: str) -> list[str] | None:
    return None if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]


def _options(args: argparse.Namespace, only: list[str] | None) -> dict:
    per_format = {name: {**opts, **({"x86_isa": args.x86_isa} if name in ("onnx", "lite") else {})}
                  for name, opts in INT8_OPTIONS[args.int8].items()}
    return {"only": only, "options": per_format,
            "static": args.int8 == "static" and any(f in (only or FORMATS) for f in STATIC_FORMATS)}


def _export(ckpt, out, *, eval_samples, calib_samples, only, options, static):
    return export_all(ckpt, out, eval_samples=eval_samples, calib_samples=calib_samples, only=only, options=options)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    only = _formats(args.formats)
    unknown = [f for f in only or [] if f not in FORMATS]
    if unknown:
        print(f"error: --formats {','.join(unknown)}: unknown; choose from {', '.join(FORMATS)} or 'all'",
              file=sys.stderr)
        return 2
    return run_cli(parser, _export, argv, lambda a: _options(a, only), static_int8=lambda o: o["static"],
                   alternatives="pass --int8 dynamic or --int8 none")


if __name__ == "__main__":
    sys.exit(main())
