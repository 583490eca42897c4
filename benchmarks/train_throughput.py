"""Training throughput: the toolkit's training step against a plain torchvision loop, same data, same run.

    python -m benchmarks.train_throughput --data ../shared/data/cxr4 --batches 40 --batch-size 32 --workers 2

Both sides: ResNet-18 (4 classes, random init), AdamW lr 1e-3, shuffled train split, same batch size and
loader workers, CPU. The toolkit side is exactly what `python -m train` runs (its loader with augmentation,
DeployModel with in-graph normalization, class-weighted loss, one-cycle schedule, `train.loop.train_step`);
the plain side is ImageFolder-style decoding + Grayscale(3)/Resize/ToTensor/Normalize transforms. The two are
timed in alternating rounds so drifting load from other processes hits both alike; the ratio is the figure
that matters on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# as in `python -m train` (see train/__main__.py): sleeping, not spinning, OpenMP threads; both sides
# run in this one process, so both get the same setting
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from train.atomic import check_writable_file  # noqa: E402
from train.errors import ToolkitError, cli_errors  # noqa: E402


class ThroughputError(ToolkitError, ValueError):
    """Settings the data cannot serve (too few images for the batches asked)."""


def _time_batches(loader, step, batches: int, warmup: int) -> float:
    """Images per second over `batches` batches after `warmup` untimed ones (loader start-up included
    in the warm-up, not in the timing), all within one pass over the data: a new pass would time the loader
    starting again."""
    if len(loader) < warmup + batches:
        raise ThroughputError(f"the train split has {len(loader)} batches of --batch-size {loader.batch_size}, "
                              f"fewer than --warmup {warmup} + {batches} timed batches per round; pass fewer "
                              f"--batches, more --rounds or a smaller --batch-size")
    it = iter(loader)
    for _ in range(warmup):
        step(*next(it))
    seen, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        step(x, y)
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def train_config(data: str, batch_size: int, workers: int, input_size: int) -> dict:
    """`python -m train`'s settings for this benchmark (random init, seed 0, its default split fractions)."""
    return {"data": data, "data_root": None, "seed": 0, "val_frac": 0.15, "test_frac": 0.15, "skip_bad": False,
            "input_size": input_size, "resize": "bilinear", "contrast_stretch": False, "balance": "loss",
            "batch_size": batch_size, "workers": workers, "weights": "none", "freeze": "none", "lr": 1e-3,
            "optimizer": "adamw", "schedule": "onecycle", "weight_decay": 1e-4, "epochs": 1}


def train_index(cfg: dict):
    """The data indexed, split (the data's own split, or the seeded one training makes) and decode-checked as
    `python -m train` does: once per run, for both sides and every round."""
    from train import recipe

    return recipe.prepare_index(cfg, progress=False)[0]


def toolkit_side(idx, cfg: dict):
    from train import recipe
    from train.distributed import DistContext
    from train.loop import seed_everything, train_step

    seed_everything(0)
    ctx = DistContext(torch.device("cpu"))
    spec = recipe.make_spec(cfg, idx.class_names)
    loader = recipe.make_train_loader(idx, spec, cfg, ctx)
    model = recipe.make_model(cfg, spec, init=True).train()
    criterion = recipe.make_criterion(cfg, idx, ctx)
    opt = recipe.make_optimizer(cfg, model)
    sched = recipe.make_scheduler(cfg, opt, len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return loader, lambda x, y: train_step(model, x, y, criterion, opt, sched, scaler, device=ctx.device)


def plain_side(idx, cfg: dict):
    import torchvision
    from torchvision import transforms as T

    from train.spec import IMAGENET_MEAN, IMAGENET_STD

    # the toolkit side's train files; decoding is torchvision's default_loader
    samples = [(str(s.path), s.label) for s in idx.split("train")]
    batch_size, workers, input_size = cfg["batch_size"], cfg["workers"], cfg["input_size"]
    tf = T.Compose([T.Grayscale(num_output_channels=3), T.Resize((input_size, input_size)), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            path, label = samples[i]
            return tf(torchvision.datasets.folder.default_loader(path)), label

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    model = torchvision.models.resnet18(weights=None, num_classes=len(idx.class_names)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return loader, step


def run(data: str, *, batches: int = 40, warmup: int = 3, batch_size: int = 32, workers: int = 2,
        input_size: int = 224, rounds: int = 2, threads: int | None = None) -> dict:
    for flag, value, least in (("--batches", batches, 1), ("--rounds", rounds, 1), ("--batch-size", batch_size, 1),
                               ("--warmup", warmup, 0), ("--workers", workers, 0)):
        if value < least:  # a ZeroDivisionError or torch's ValueError otherwise, after the data is read
            raise ThroughputError(f"{flag} must be at least {least}, got {value}")
    if threads:
        torch.set_num_threads(threads)
    sides = {"plain_torchvision": plain_side, "toolkit": toolkit_side}
    cfg = train_config(data, batch_size, workers, input_size)
    idx = train_index(cfg)
    results: dict[str, list[float]] = {k: [] for k in sides}
    per_round = max(1, batches // rounds)
    for r in range(rounds):
        for name, make in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
            loader, step = make(idx, cfg)
            ips = _time_batches(loader, step, per_round, warmup)
            results[name].append(round(ips, 3))
            print(f"round {r + 1}/{rounds} {name}: {ips:.2f} images/s", flush=True)
    summary = {k: round(sum(v) / len(v), 3) for k, v in results.items()}
    return {"images_per_s": summary, "rounds": results, "ratio_toolkit_over_plain":
            round(summary["toolkit"] / summary["plain_torchvision"], 3),
            "settings": {"batches": per_round * rounds, "warmup": warmup, "batch_size": batch_size,
                         "workers": workers, "input_size": input_size, "threads": torch.get_num_threads()}}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cxr4", help="data folder or CSV (default ../shared/data/cxr4)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per side, over all rounds (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each timing (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--workers", type=int, default=2, help="loader processes (default 2)")
    p.add_argument("--input-size", type=int, default=224, help="default 224")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    a = p.parse_args(argv)
    if not Path(a.data).exists():
        raise ThroughputError(f"--data {a.data}: no such file or folder")
    if a.json:
        check_writable_file(a.json, "--json")
    result = run(a.data, batches=a.batches, warmup=a.warmup, batch_size=a.batch_size, workers=a.workers,
                 input_size=a.input_size, rounds=a.rounds, threads=a.threads)
    print(json.dumps(result, indent=2))
    if a.json:
        from train.atomic import write_json

        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
