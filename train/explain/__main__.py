"""`python -m train.explain`: the standalone explanation report, optionally with float-vs-int8 heatmaps.

The entry point is the one place in `train.explain` that may import `quantize` (the import-layer
contract exempts `__main__` modules): it builds the --int8 step and hands it to `run_explain`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from train.atomic import check_writable_dir
from train.checkpoint import Checkpoint
from train.data import SPLITS, DataError, DatasetIndex, Sample, seeded_subset
from train.errors import cli_errors
from train.explain.run import run_explain


@dataclass(frozen=True)
class StaticInt8Comparison:
    """--int8: calibrate a static int8 model on the train split and compare its heatmaps with float."""

    data: str
    engine: str = "qnnpack"
    calib_size: int = 128
    seed: int = 0

    def check(self) -> None:
        from quantize.torch_ao import check_engine

        check_engine(self.engine)

    def __call__(self, ckpt: Checkpoint, index: DatasetIndex, samples: list[Sample], out_dir: Path,
                 per_class: int, progress: bool) -> tuple[str, dict]:
        from quantize.cam_compare import compare_float_int8
        from quantize.variants import make_int8_model

        train = index.split("train")
        if not train:  # calibrating on the images being compared would flatter int8
            raise DataError(f"--int8: {self.data} has no train split to calibrate on; "
                            f"pass data with a train split")
        calib = seeded_subset(train, self.calib_size, self.seed)
        qmodel = make_int8_model(ckpt, "static", self.engine, calib, progress=progress)
        md, info = compare_float_int8(ckpt, qmodel, samples, out_dir, per_class, progress=progress)
        info.update({"mode": "static", "engine": self.engine, "calibration_images": len(calib)})
        return md, info


def build_parser() -> argparse.ArgumentParser:
    """The command line; flags are part of the documented interface, so keep them stable."""
    p = argparse.ArgumentParser(prog="python -m train.explain", description=(
        "Write a standalone explanation report: one-vs-rest ROC curves, Grad-CAM/EigenCAM overlays, a "
        "shortcut audit (heatmap mass at the border, accuracy per source, source-only baseline) and, with "
        "--int8, float-vs-int8 heatmaps."))
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt) to explain")
    p.add_argument("--data", required=True, help="dataset folder or CSV (path,label[,split][,source])")
    p.add_argument("--split", default="val", choices=SPLITS, help="split to evaluate (default val)")
    p.add_argument("--per-class", type=int, default=4, help="heatmap images per class (default 4)")
    p.add_argument("--out", default="reports/explain", help="output folder (default reports/explain)")
    p.add_argument("--int8", action="store_true", help="also compare float and static int8 heatmaps")
    p.add_argument("--engine", default="qnnpack", help="quantized engine for --int8 (default qnnpack)")
    p.add_argument("--calib-size", type=int, default=128, help="train images to calibrate int8 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing images (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; a ToolkitError (bad checkpoint, data, engine) prints `error: ...` and exits 2."""
    a = build_parser().parse_args(argv)
    if a.int8 and a.calib_size < 1:  # before the float work, with the flag's own name
        raise DataError(f"--calib-size must be at least 1, got {a.calib_size}")
    check_writable_dir(a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    int8 = StaticInt8Comparison(a.data, a.engine, a.calib_size, a.seed) if a.int8 else None
    report = run_explain(a.checkpoint, a.data, split=a.split, per_class=a.per_class, out_dir=Path(a.out),
                         int8=int8, seed=a.seed, progress=not a.no_progress)
    print(f"wrote {Path(a.out) / 'explain.md'} (macro AUC {report['roc']['macro_auc']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
