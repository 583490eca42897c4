"""`python -m export`: every registered format (ONNX, CoreML, ExecuTorch, TorchScript Lite, TorchScript,
TorchServe), each verified in its own runtime and recorded in <out>/artifacts.json; a format that fails
is a 'failed' row with the reason, and the others still export."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from export.common import add_common_args, run_cli
from export.formats import FORMATS, export_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                epilog="formats: " + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values()))
    add_common_args(p)
    p.add_argument("--formats", default="all",
                   help=f"comma-separated formats to export, from {', '.join(FORMATS)} (default: all)")
    return p


def _formats(value: str) -> list[str] | None:
    return None if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]


def _export(ckpt, out, *, eval_samples, calib_samples, only):
    return export_all(ckpt, out, eval_samples=eval_samples, calib_samples=calib_samples, only=only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    only = _formats(args.formats)
    unknown = [f for f in only or [] if f not in FORMATS]
    if unknown:
        print(f"error: --formats {','.join(unknown)}: unknown; choose from {', '.join(FORMATS)} or 'all'",
              file=sys.stderr)
        return 2
    return run_cli(parser, _export, argv, lambda a: {"only": only})


if __name__ == "__main__":
    sys.exit(main())
