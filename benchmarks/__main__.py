"""`python -m benchmarks`: measure every exported artifact side by side, each in its own runtime."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from train.atomic import check_writable_dir
from train.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark every artifact in ARTIFACTS/artifacts.json plus the float PyTorch model: size, "
                    "load time, latency (batch 1, 1 thread and all cores), throughput, memory, accuracy and "
                    "agreement with float. Each artifact runs in a fresh process.")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="folder holding artifacts.json written by `python -m export` (default: artifacts)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the checkpoint the artifacts were exported from: the float baseline")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled images (folder with labels.csv, class folders, or a CSV)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="which split to score on (default: val)")
    p.add_argument("--max-images", type=int, default=None,
                   help="score on a seeded, class-balanced subset of at most N images (default: all)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per latency figure (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="discarded warm-up runs before timing (default: 5)")
    p.add_argument("--threads-all", type=int, default=None,
                   help="thread count for the 'all cores' figures (default: the CPUs this process may use)")
    p.add_argument("--batch", type=int, default=32, help="batch size for throughput (default: 32)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy drop from float, in percentage points, allowed for a recommendation (default: 1.0)")
    p.add_argument("--only", default=None,
                   help="comma-separated artifact names to measure (default: all in the manifest)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a worker measuring one artifact is stopped (default: 900)")
    p.add_argument("--out", type=Path, default=Path("reports/benchmarks"),
                   help="folder for report.md/json/csv/png (default: reports/benchmarks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from benchmarks.run import BenchmarkError, run_benchmarks
    from export.manifest import ManifestError
    from train.checkpoint import CheckpointError
    from train.data import DataError

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        result = run_benchmarks(args.artifacts, args.checkpoint, args.data, split=args.split, out_dir=args.out,
                                max_images=args.max_images, runs=args.runs, warmup=args.warmup,
                                threads_all=args.threads_all, batch=args.batch, max_drop=args.max_drop,
                                only=only, timeout=args.timeout, progress=not args.quiet, command=command)
    except (BenchmarkError, CheckpointError, DataError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {', '.join(result['outputs'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
