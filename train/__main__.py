"""`python -m train`: train the chest X-ray ResNet-18 (no --data: a small SYNTHETIC demo on the CPU).

Also under torchrun: `torchrun --nproc_per_node=N -m train --data ...` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU shared with other
# processes (or loader workers) spinning threads steal the cores the real work needs; measured here it
# made a tiny CPU training run ~7x slower. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.distributed import DEVICES  # noqa: E402  (after the OpenMP setting)
from train.errors import cli_errors  # noqa: E402
from train.model import FREEZE_MODES  # noqa: E402
from train.distributed import DEFAULT_TIMEOUT_S  # noqa: E402
from train.recipe import AMP_MODES, BALANCE, OPTIMIZERS, SCHEDULES, TrainError  # noqa: E402
from train.spec import RESIZE_METHODS  # noqa: E402

# the built-in demo: about a minute on 2 CPU cores, weights from scratch so it works offline
DEMO = {"epochs": 4, "batch_size": 16, "input_size": 64, "weights": "none", "workers": 0, "lr": 2e-3}
REAL = {"epochs": 10, "batch_size": 32, "input_size": 224, "weights": "imagenet", "workers": None, "lr": 1e-3}
OTHER = {"optimizer": "adamw", "schedule": "onecycle", "freeze": "none", "resize": "bilinear",
         "contrast_stretch": False, "balance": "loss", "seed": 0, "skip_bad": False, "val_frac": 0.15,
         "test_frac": 0.15, "weight_decay": 1e-4, "data_root": None, "sync_bn": False, "amp": "auto",
         "deterministic": False, "dist_timeout": DEFAULT_TIMEOUT_S}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.strip().splitlines()[0])
    a = p.add_argument
    a("--data", help="data folder (<Class>/images/*, <Class>/*, or with labels.csv) or a CSV "
                     "path,label[,split]; omitted: generate SYNTHETIC data and run the demo")
    a("--data-root", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    a("--out", help="run folder (default runs/<data name>-<UTC time>); --resume needs it")
    a("--epochs", type=int, help="epochs (default 10; demo 4)")
    a("--batch-size", type=int, help="images per step over all processes (default 32; demo 16)")
    a("--lr", type=float, help="peak learning rate (default 1e-3; demo 2e-3)")
    a("--optimizer", choices=OPTIMIZERS, help="default adamw")
    a("--schedule", choices=SCHEDULES, help="learning-rate schedule, stepped per batch (default onecycle)")
    a("--weight-decay", type=float, help="default 1e-4")
    a("--weights", help="imagenet (torchvision, cached in TORCH_HOME), none (random init) or PATH to a "
                        "state dict/checkpoint (default imagenet; demo none)")
    a("--freeze", choices=FREEZE_MODES, help="layer4: train only layer4 + head; head: only the head "
                                             "(default none)")
    a("--input-size", type=int, help="square input side in pixels (default 224; demo 64)")
    a("--resize", choices=RESIZE_METHODS, help="resize method (default bilinear)")
    a("--contrast-stretch", action="store_true", default=None,
      help="per-image min-max contrast stretch inside the model")
    a("--balance", choices=BALANCE, help="class imbalance: loss = class-weighted loss, sampler = "
                                         "weighted sampler, none (default loss)")
    a("--seed", type=int, help="seed for split, init, shuffling and augmentation (default 0)")
    a("--device", default="auto", choices=DEVICES, help="auto = CUDA, then MPS, then CPU (default auto)")
    a("--workers", type=int, help="data loader processes per training process (default: the CPU count shared "
                                  "by the processes on this machine, at most 8; demo 0)")
    a("--amp", choices=AMP_MODES, help="mixed precision: auto = bf16 on GPUs that support it, else fp16 with a "
                                      "loss scaler; fp32 on CPU and MPS (default auto)")
    a("--sync-bn", action="store_true", default=None,
      help="under torchrun on GPUs: BatchNorm statistics over the global batch, not each GPU's share")
    a("--deterministic", action="store_true", default=None,
      help="deterministic kernels only (GPU runs replay bit for bit; slower), cuDNN autotuning off")
    a("--dist-timeout", type=float, help=f"under torchrun: seconds a collective waits for a rank that hangs "
                                         f"before the job ends with an error (default {DEFAULT_TIMEOUT_S})")
    a("--skip-bad", action="store_true", default=None,
      help="skip unreadable images (listed in the log and config.json) instead of stopping")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--stop-after", type=int, help="end this invocation after N epochs (continue later with --resume)")
    a("--val-frac", type=float, help="validation share when the data has no split (default 0.15)")
    a("--test-frac", type=float, help="test share when the data has no split (default 0.15)")
    a("--no-report", action="store_true", help="skip the evaluation report after training")
    a("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def resolve_args(a: argparse.Namespace) -> tuple[dict, dict | None]:
    """Unset flags take the run's stored value on --resume, else the demo or real-data default. Also returns
    the run state read for --resume (last.pt: weights and optimizer), so training does not read it again."""
    given = {k: v for k, v in vars(a).items() if v is not None}
    state = None
    if a.resume:
        if not a.out:
            raise TrainError("--resume needs --out pointing at the run folder to continue")
        from train.loop import read_run_state

        state = read_run_state(Path(a.out))
        base = {**REAL, **OTHER, **state["train_config"]}
    else:
        base = {**(REAL if a.data else DEMO), **OTHER, "data": None}
    kw = {**base, **given}
    if not kw.get("out"):
        name = Path(a.data).stem if a.data else "synthetic"
        kw["out"] = f"runs/{name}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    return kw, state


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from train.loop import train_model
    from train.cpu import fit_torch_threads
    from train.memory import keep_freed_memory

    keep_freed_memory()  # before the loader's worker processes fork, so they keep freed memory too
    fit_torch_threads()
    kw, run_state = resolve_args(a)
    best = train_model(
        kw["data"], kw["out"], epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"],
        optimizer=kw["optimizer"], schedule=kw["schedule"], weights=kw["weights"], freeze=kw["freeze"],
        input_size=kw["input_size"], seed=kw["seed"], device=kw["device"], workers=kw["workers"],
        progress=not a.no_progress, skip_bad=kw["skip_bad"], resume=a.resume, resize=kw["resize"],
        contrast_stretch=kw["contrast_stretch"], balance=kw["balance"], val_frac=kw["val_frac"],
        test_frac=kw["test_frac"], data_root=kw["data_root"], weight_decay=kw["weight_decay"],
        stop_after=kw.get("stop_after"), evaluate=not a.no_report, sync_bn=kw["sync_bn"], amp=kw["amp"],
        deterministic=kw["deterministic"], dist_timeout=kw["dist_timeout"], run_state=run_state)
    if rank == 0:
        print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
