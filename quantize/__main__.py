"""`python -m quantize`: float vs every int8 variant (PyTorch dynamic/static, ONNX Runtime dynamic/static)
on the same images; Markdown + JSON + PNG report; optional release gate (--max-drop)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quantize.onnx_rt import CALIB_METHODS
from quantize.torch_ao import LEGACY_REDUCE_RANGE, REDUCE_RANGE_CHOICES, X86_ISA_CHOICES
from train.atomic import check_writable_dir, require_free_space
from train.model import weight_bytes
from train.errors import cli_errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantize", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt (toolkit format or ResNet-18 state dict)")
    p.add_argument("--data", required=True, help="dataset folder or labels CSV (needs a train split for "
                                                 "calibration; folder datasets get a seeded split)")
    p.add_argument("--split", default="val", choices=("val", "test"), help="split to evaluate on (default val)")
    p.add_argument("--calib-size", type=int, default=300, help="calibration images from the TRAIN split (default 300)")
    p.add_argument("--calib-method", default="MinMax", choices=CALIB_METHODS,
                   help="ONNX Runtime static calibration method (default MinMax)")
    p.add_argument("--engines", default="qnnpack,x86",
                   help="comma-separated PyTorch quantized engines for static int8 (default qnnpack,x86); "
                        "the first one is also used for dynamic int8")
    p.add_argument("--x86-isa", default=None, choices=X86_ISA_CHOICES,
                   help="x86 CPUs the server-side int8 variants (torch x86, ONNX Runtime static) must stay exact on: "
                        "avx2 = every x86-64 CPU (7-bit weights, saturation-free), vnni = only CPUs "
                        "with VNNI/AMX (full 8 bits), auto = this machine (default)")
    p.add_argument("--reduce-range", default=None, choices=REDUCE_RANGE_CHOICES,
                   help="older spelling of --x86-isa: on = avx2, off = vnni")
    p.add_argument("--max-drop", type=float, default=None,
                   help="release gate: exit 1 if any variant loses more than this many accuracy points or any "
                        "class more recall points")
    p.add_argument("--out", type=Path, default=Path("reports/quantize"), help="report folder (default reports/quantize)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on a seeded subset of this many images")
    p.add_argument("--cam", type=int, default=0, help="Grad-CAM float vs int8 for N images per class (default 0: off)")
    p.add_argument("--sensitivity", action="store_true",
                   help="run per-layer sensitivity and the float-fallback variant even within budget")
    p.add_argument("--fallback-layers", type=int, default=2, help="most sensitive layers kept float (default 2)")
    p.add_argument("--sensitivity-layers", default=None,
                   help="comma-separated layer names to rank (default: every conv/linear layer, e.g. conv1,fc)")
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per variant (default 30)")
    p.add_argument("--threads", type=int, default=2, help="torch/ORT threads for evaluation (timing uses 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0); a split the data "
                   "lacks is made with seed 0, as every stage makes it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_writable_dir(args.out)
    # INFO for this toolkit only: ONNX Runtime's quantizer logs one root INFO line per tensor
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("quantize", "train", "export"):
        logging.getLogger(name).setLevel(logging.INFO)
    from benchmarks.quant_report import ReportError, run_quantization_report
    from train.cpu import fit_torch_threads
    from train.memory import keep_freed_memory

    fit_torch_threads()
    keep_freed_memory()  # batched calibration and scoring; its latencies are batch 1, which this does not move
    # before calibrating: the ONNX fp32 and two int8 files it writes to OUT/models are 1.5x the weights
    require_free_space(args.out, int(weight_bytes() * 1.5) + (8 << 20), f"the quantization report {args.out}")

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    legacy = LEGACY_REDUCE_RANGE.get(args.reduce_range, args.reduce_range)
    if args.x86_isa and legacy and args.x86_isa != legacy:
        raise ReportError(f"--x86-isa {args.x86_isa} and --reduce-range {args.reduce_range} disagree; "
                          f"pass only --x86-isa")
    x86_isa = args.x86_isa or legacy or "auto"
    for flag, value, lo in (("--calib-size", args.calib_size, 1), ("--fallback-layers", args.fallback_layers, 1),
                            ("--max-images", args.max_images if args.max_images is not None else 1, 1),
                            ("--threads", args.threads, 1)):
        if value < lo:
            raise ReportError(f"{flag} must be at least {lo}, got {value}")
    report = run_quantization_report(
        args.checkpoint, args.data, split=args.split, out_dir=args.out, calib_size=args.calib_size,
        calib_method=args.calib_method, engines=engines, max_drop=args.max_drop, max_images=args.max_images,
        cam=args.cam, sensitivity=args.sensitivity, fallback_layers=args.fallback_layers,
        sensitivity_layers=[n.strip() for n in args.sensitivity_layers.split(",") if n.strip()]
        if args.sensitivity_layers else None,
        latency_runs=args.latency_runs, threads=args.threads, seed=args.seed, reduce_range=x86_isa,
        progress=not args.no_progress)
    print(f"report: {report['files']['markdown']}")
    for name, v in report["variants"].items():
        m = v["metrics"]
        print(f"  {name:34s} acc {100 * m['accuracy']:6.2f}% ({m['accuracy_change_points']:+.2f})  agree "
              f"{100 * m['top1_agreement']:6.2f}%  size {v['size_ratio']:.3f}x  speedup "
              f"{(v.get('speedup_vs_float') or 0):.1f}x")
    if not report["gate"]["passed"]:
        print("quantization budget exceeded:\n  " + "\n  ".join(report["gate"]["violations"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
