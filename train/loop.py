"""The training engine: epochs of train + validate, best/last checkpoints, resume, and the final report.

Single process or DistributedDataParallel under torchrun (see train.distributed); only rank 0 writes.
The model trained is DeployModel(net, spec), so normalization is in the graph exactly as exported;
checkpoints hold only net.state_dict() plus plain metadata (readable with weights_only=True).
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import distributed as D
from train import recipe
from train.atomic import check_writable_dir, require_free_space, write_json
from train.checkpoint import make_checkpoint_dict, save_checkpoint
from train.data import discover
from train.metrics import classification_metrics, predict_logits
from train.model import fetch_imagenet_weights
from train.recipe import TrainError
from train.weights_file import read_raw

log = logging.getLogger(__name__)

BEST_METRIC = "macro_f1"  # best.pt = highest validation macro-F1 (ties keep the earlier epoch)
# settings that define a run; on --resume the stored values are used
RUN_KEYS = ("data", "data_root", "epochs", "batch_size", "lr", "optimizer", "schedule", "weights", "freeze",
            "input_size", "resize", "contrast_stretch", "balance", "seed", "skip_bad", "val_frac",
            "test_frac", "weight_decay", "sync_bn", "amp", "deterministic")
# values of settings added later, for resuming runs whose last.pt predates them
LEGACY_DEFAULTS = {"sync_bn": False, "amp": "auto", "deterministic": False}


def train_model(data: str | Path | None, out_dir: str | Path, *, epochs: int = 10, batch_size: int = 32,
                lr: float = 1e-3, optimizer: str = "adamw", schedule: str = "cosine", weights: str = "none",
                freeze: str = "none", input_size: int = 224, seed: int = 0, device: str = "auto",
                workers: int | None = None, progress: bool = True, skip_bad: bool = False, resume: bool = False,
                resize: str = "bilinear", contrast_stretch: bool = False, balance: str = "loss",
                val_frac: float = 0.15, test_frac: float = 0.15, data_root: str | Path | None = None,
                weight_decay: float = 1e-4, stop_after: int | None = None, evaluate: bool = True,
                synthetic_per_class: int = 60, sync_bn: bool = False, amp: str = "auto",
                deterministic: bool = False, dist_timeout: float = D.DEFAULT_TIMEOUT_S,
                run_state: dict[str, Any] | None = None) -> Path:
    """Train (or resume) a run in `out_dir` and return the path of its best.pt.

    data=None trains on SYNTHETIC images generated into out_dir/synthetic-data (the built-in demo).
    stop_after=N ends this invocation after N epochs (resume later with resume=True).
    workers=None: loader processes from the CPU count (recipe.default_workers).
    run_state: on resume, out_dir's last.pt as read_run_state returned it, where the caller has read it already."""
    out_dir = Path(out_dir).resolve()
    cfg = {k: v for k, v in locals().items() if k in RUN_KEYS}
    if stop_after is not None and stop_after < 1:
        raise TrainError(f"--stop-after must be at least 1 epoch, got {stop_after}")
    check_writable_dir(out_dir)  # a run folder that cannot be written fails now, not at the first checkpoint
    require_free_space(out_dir, checkpoint_room(resume), f"the checkpoints of {out_dir}")
    if not resume:  # before the run folder exists: a mistyped setting or --data leaves nothing behind
        recipe.check_choices({**cfg, "workers": workers})
        if data is not None:
            discover(data, data_root=data_root)  # its layout, classes and CSV: a fraction of a second
        if weights == "imagenet":
            fetch_imagenet_weights()  # offline, the error comes now, not after the images are checked
    ctx = D.init(device, timeout_s=dist_timeout)
    if not resume:
        recipe.amp_dtype(cfg.get("amp") or "auto", ctx.device)  # --amp fp16 on a CPU: refused before train.log
    handler = _log_to_file(out_dir) if ctx.is_main else None
    failed = True
    try:
        state = (run_state or read_run_state(out_dir)) if resume else None  # last.pt: weights and optimizer
        cfg = _resolve_config(cfg, out_dir, state, ctx, synthetic_per_class)
        workers = recipe.default_workers() if workers is None else workers
        best = _run(cfg, out_dir, ctx, workers=workers, progress=progress and ctx.is_main,
                    state=state, stop_after=stop_after, evaluate=evaluate)
        failed = False
        return best
    except RuntimeError as err:
        if not D.is_collective_failure(err, ctx):
            raise
        raise TrainError(f"rank {ctx.rank}: a collective with the other processes failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[-1][:200] if str(err) else ''}); another rank ended with an error or "
                         f"hung for --dist-timeout {dist_timeout:g} s: see its log above") from err
    finally:
        if handler is not None:
            logging.getLogger("train").removeHandler(handler)
            handler.close()
        D.cleanup(ctx, failed=failed)


def checkpoint_room(resume: bool) -> int:
    """Bytes a run's checkpoints need free: best.pt (the weights) and last.pt (the weights and AdamW's two
    moments: 3x), each written beside the file it replaces; a new run has neither yet. Checked before the first
    epoch, which on real data takes minutes to hours, rather than at its end."""
    from train.model import weight_bytes

    return weight_bytes() * (4 if resume else 7)


def _log_to_file(out_dir: Path) -> logging.Handler:
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


RUN_STATE_KEYS = ("train_config", "resume", "history", "state_dict", "split_fingerprint")


def read_run_state(out_dir: Path) -> dict[str, Any]:
    """What --resume continues from: the run folder's last.pt, read weights-only like every checkpoint, and
    refused with an error naming it unless `python -m train` wrote it (a plain checkpoint has no run state)."""
    last = Path(out_dir) / "last.pt"
    if not last.is_file():
        raise TrainError(f"--resume: {last} does not exist; start the run without --resume")
    state = read_raw(last)
    missing = [k for k in RUN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainError(f"--resume: {last} is not the run state `python -m train` writes (no {', '.join(missing)}); "
                         f"point --out at the folder of the run to continue, or start a new run without --resume")
    return state


def _resolve_config(cfg: dict[str, Any], out_dir: Path, state: dict[str, Any] | None, ctx: D.DistContext,
                    per_class: int) -> dict[str, Any]:
    last = out_dir / "last.pt"
    if state is not None:  # --resume
        stored = state["train_config"]
        changed = {k: v for k, v in cfg.items() if k in stored and v is not None and k != "data"
                   and v != stored[k]}
        if changed:
            log.warning("--resume uses the run's stored settings; ignoring %s (stored: %s)", changed,
                        {k: stored[k] for k in changed})
        moved = cfg["data"] is not None and stored.get("data") and Path(cfg["data"]) != Path(stored["data"])
        if moved:  # the folder moved or was copied: the same data wherever it is (the split fingerprint decides)
            log.info("--resume: reading the data from %s, not %s where the run started; it must be the same data",
                     cfg["data"], stored["data"])
        return {**LEGACY_DEFAULTS, **stored, **({"data": str(Path(cfg["data"]).resolve())} if moved else {})}
    if last.exists():
        raise TrainError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or "
                         f"choose another --out")
    if cfg["data"] is None:
        synth = out_dir / "synthetic-data"
        if ctx.is_main and not synth.is_dir():
            from train.synthetic import make_synthetic_dataset

            log.info("no --data: generating SYNTHETIC images in %s", synth)
            make_synthetic_dataset(synth, per_class=per_class, size=cfg["input_size"], seed=cfg["seed"])
        D.barrier(ctx)
        cfg["data"] = str(synth)
    else:
        cfg["data"] = str(Path(cfg["data"]).resolve())
    cfg["data_root"] = str(Path(cfg["data_root"]).resolve()) if cfg["data_root"] else None
    return cfg


def check_resume_world_size(saved: int | None, current: int) -> None:
    """The per-rank batch, the steps per epoch and so the restored LR schedule depend on the process
    count: a run resumed with another count would overrun OneCycleLR or bend cosine. Refuse it."""
    if saved is not None and int(saved) != current:
        raise TrainError(f"--resume: this run was trained with {saved} process(es) and is being resumed with "
                         f"{current}; the per-rank batch and the learning-rate schedule depend on that number. "
                         f"Resume with the same count (torchrun --nproc_per_node={saved}), or start a new run "
                         f"with another --out")


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """A CPU or MPS run saves a disabled scaler's empty state; loading that into an enabled CUDA scaler
    raises. Start a fresh scaler then (and ignore a CUDA scaler's state on a CPU resume)."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        log.info("--resume: the run had no loss-scaler state (trained without CUDA AMP); starting a fresh one")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The RNG seed of one rank's epoch: augmentation in the main process and the loader's worker seeds.

    Rank 0 keeps the single-process value, so a 1-process run is unchanged; other ranks are offset by a
    large prime so no two ranks (or two epochs) share a stream: with one seed for all, N GPUs applied the
    same random transforms and saw 1/N of the augmentation diversity."""
    return seed * 1000 + epoch + rank * 1_000_003


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run(cfg: dict[str, Any], out_dir: Path, ctx: D.DistContext, *, workers: int, progress: bool,
         state: dict[str, Any] | None, stop_after: int | None, evaluate: bool) -> Path:
    """Train from scratch, or from `state` (the run's last.pt) on --resume."""
    seed_everything(cfg["seed"])
    recipe.configure_determinism(cfg["deterministic"], ctx.device)
    # rank 0 decodes the index and every rank gets its answer: ranks cannot disagree about the data
    idx, generated, duplicates = D.from_main(lambda: recipe.prepare_index(cfg, progress), ctx)
    spec = recipe.make_spec(cfg, idx.class_names)
    summary = recipe.data_summary(idx, generated, out_dir, duplicates)
    if state is not None and state["split_fingerprint"] != summary["split_fingerprint"]:
        raise TrainError(f"--resume: the data under {cfg['data']} changed since this run started (split "
                         f"fingerprint differs); start a new run with another --out")
    use_cuda = ctx.device.type == "cuda"
    model = recipe.make_model(cfg, spec, init=state is None).to(ctx.device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    model = recipe.apply_sync_bn(model, cfg["sync_bn"], ctx)
    loader = recipe.make_train_loader(idx, spec, {**cfg, "workers": workers}, ctx)
    criterion = recipe.make_criterion(cfg, idx, ctx)
    opt = recipe.make_optimizer(cfg, model)
    sched = recipe.make_scheduler(cfg, opt, len(loader))
    dtype = recipe.amp_dtype(cfg["amp"], ctx.device)
    # a loss scaler only for fp16 (bf16 has fp32's range)
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and dtype == torch.float16)
    history, best = [], {"score": -1.0, "epoch": None, "metrics": {}}
    if state is not None:
        history, best = _restore(state, model, (opt, sched, scaler), ctx)
        log.info("resuming %s after epoch %d of %d", out_dir, state["resume"]["epoch"], cfg["epochs"])
    run = {"cfg": cfg, "spec": spec, "summary": summary, "ctx": ctx, "out_dir": out_dir}
    if ctx.is_main:
        _write_run_files(run, idx, generated, status="training")
    ddp_model = D.wrap(model, ctx)
    start = len(history)
    try:
        for epoch in range(start, cfg["epochs"]):
            if stop_after is not None and epoch - start >= stop_after:
                log.info("stopping after %d epoch(s) as asked; continue with --resume", stop_after)
                break
            row = _train_epoch(ddp_model, loader, (criterion, opt, sched, scaler, dtype), ctx, epoch, cfg, progress)
            D.broadcast_buffers(model, ctx)
            val = _validate(model, idx.split("val"), spec, ctx, (workers, cfg["batch_size"], dtype), progress)
            if val is None:
                raise TrainError(_diverged(epoch + 1, row, cfg, best, out_dir))
            row.update({f"val_{k}": val[k] for k in ("loss", "accuracy", "macro_f1")},
                       val_recall={c: m["recall"] for c, m in val["per_class"].items()})
            history.append(row)
            if val[BEST_METRIC] > best["score"]:
                best = {"score": val[BEST_METRIC], "epoch": epoch + 1, "metrics": val}
            _log_epoch(row, cfg["epochs"])
            if ctx.is_main:
                _save(run, model, history, best, opt, sched, scaler, improved=best["epoch"] == epoch + 1)
            D.barrier(ctx)
    except BaseException as err:  # config.json must not say "training" for a run that stopped
        if ctx.is_main:  # Ctrl-C or SIGTERM (the CLI turns it into KeyboardInterrupt): --resume goes on
            _write_run_files(run, idx, False, status="interrupted" if isinstance(err, KeyboardInterrupt) else
                             "failed", history=history, best=best)
        raise
    ddp_check = D.check_replicas(model, spec.input_size, ctx)
    best_path = out_dir / "best.pt"
    if ctx.is_main:
        done = len(history) >= cfg["epochs"]
        report = None
        if done and evaluate:
            report = _final_report(best_path, idx, workers, progress, out_dir, history)
        _write_run_files(run, idx, False, status="finished" if done else "interrupted", history=history,
                         best=best, ddp_check=ddp_check, report=report)
    D.barrier(ctx)
    return best_path


def _restore(state: dict[str, Any], model: torch.nn.Module, optim_parts: tuple,
             ctx: D.DistContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model, optimizer, scheduler and loss scaler back where last.pt left them; returns its history and best."""
    opt, sched, scaler = optim_parts
    r = state["resume"]
    check_resume_world_size(r.get("world_size"), ctx.world_size)
    model.net.load_state_dict(state["state_dict"])
    opt.load_state_dict(r["optimizer"])
    sched.load_state_dict(r["scheduler"])
    restore_scaler(scaler, r["scaler"])
    return list(state["history"]), dict(r["best"])


def _train_epoch(model, loader, step_parts, ctx: D.DistContext, epoch: int, cfg: dict[str, Any],
                 progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    # anything random outside the loader depends only on (seed, epoch, rank); the loader's augmentation
    # comes from the sampler's per-position seeds, so --resume replays exactly what an uninterrupted run did
    torch.manual_seed(epoch_seed(cfg["seed"], epoch, ctx.rank))
    loader.sampler.set_epoch(epoch)
    model.train()
    # running sums stay on the device: reading them every step would stall the GPU twice per batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch", disable=not progress)
    for step, (x, y) in enumerate(bar):
        y = y.to(ctx.device, non_blocking=True)
        loss, logits = train_step(model, x, y, *step_parts, device=ctx.device)
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.3f}")
    loss_sum, correct = float(loss_sum), int(correct)
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen = D.all_reduce_sum([loss_sum, correct, seen], ctx)
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "lr": step_parts[1].param_groups[0]["lr"], "train_images": int(seen), "train_seconds": round(seconds, 2),
            "images_per_s": round(seen / max(seconds, 1e-9), 2)}


def train_step(model, x, y, criterion, opt, sched, scaler, dtype: torch.dtype | None = None, *,
               device: torch.device):
    """One optimisation step: autocast in `dtype` (None: fp32), channels-last on CUDA. Returns (loss, logits),
    both still on the device."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
        loss = criterion(logits, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach(), logits.detach()


def _validate(model, samples, spec, ctx: D.DistContext, loading: tuple[int, int, torch.dtype | None],
              progress: bool) -> dict[str, Any]:
    """Each rank predicts its shard; the logits are gathered so every rank computes the same metrics."""
    workers, batch_size, dtype = loading
    mine = D.shard(len(samples), ctx)
    logits = predict_logits(model, [samples[i] for i in mine], spec, device=ctx.device,
                            batch_size=batch_size, workers=workers, progress=progress, desc="validate",
                            channels_last=ctx.device.type == "cuda", autocast=dtype)
    parts = D.all_gather_objects((mine, logits), ctx)
    full = np.zeros((len(samples), spec.num_classes), dtype=np.float32)
    for ids, lg in parts:
        full[ids] = lg
    if not np.isfinite(full).all():
        return None  # diverged: no metric means anything
    return classification_metrics([s.label for s in samples], full, spec.class_names)


def _diverged(epoch: int, row: dict[str, Any], cfg: dict[str, Any], best: dict[str, Any], out_dir: Path) -> str:
    kept = (f"best.pt (epoch {best['epoch']}) and last.pt are kept" if best["epoch"] else "no checkpoint was saved")
    return (f"training diverged in epoch {epoch}: the model's outputs on the val images are not finite (train loss "
            f"{row['train_loss']:.4g}); {kept} in {out_dir}. Train again with a lower --lr (this run: {cfg['lr']:g})"
            + (" or --amp bf16/off" if cfg.get("amp") == "fp16" else ""))


def _log_epoch(row: dict[str, Any], epochs: int) -> None:
    log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f macro-F1 %.3f | %.1f img/s",
             row["epoch"], epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
             row["val_accuracy"], row["val_macro_f1"], row["images_per_s"])


def _save(run: dict[str, Any], model, history, best, opt, sched, scaler, improved: bool) -> None:
    cfg, spec, summary = run["cfg"], run["spec"], run["summary"]
    common = dict(train_config=cfg, history=history, split_fingerprint=summary["split_fingerprint"])
    epoch = len(history)
    if improved:
        extra = {"epoch": epoch, "best_metric": BEST_METRIC}
        save_checkpoint(make_checkpoint_dict(model.net.state_dict(), spec, metrics=best["metrics"],
                                             extra=extra, **common), run["out_dir"] / "best.pt")
    resume = {"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "scaler": scaler.state_dict(), "best": best, "world_size": run["ctx"].world_size}
    metrics = history[-1] if history else {}
    write_json(run["out_dir"] / "history.json", history)  # readable while the run goes on
    save_checkpoint(make_checkpoint_dict(model.net.state_dict(), spec, metrics=metrics,
                                         extra={"epoch": epoch, "resume": resume}, **common),
                    run["out_dir"] / "last.pt")


def _final_report(best_path: Path, idx, workers: int, progress: bool, out_dir: Path,
                  history: list[dict[str, Any]]) -> dict[str, Any]:
    from train.evaluate import evaluate_checkpoint

    split = "test" if idx.split("test") else "val"
    result = evaluate_checkpoint(best_path, idx, split=split, out_dir=out_dir / "report", workers=workers,
                                 progress=progress, history=history)  # every epoch, not best.pt's up to its own
    log.info("report on the %s split: %s", split, out_dir / "report" / "report.md")
    return {"split": split, "path": str(out_dir / "report" / "report.md"),
            "accuracy": result["metrics"]["accuracy"], "macro_f1": result["metrics"]["macro_f1"]}


def _write_run_files(run: dict[str, Any], idx, generated: bool, *, status: str, history=None, best=None,
                     ddp_check=None, report=None) -> None:
    from train.data import write_splits_csv

    out_dir, ctx = run["out_dir"], run["ctx"]
    if generated:
        write_splits_csv(idx, out_dir / "splits.csv")
    config = {"status": status, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "train_config": run["cfg"], "spec": run["spec"].to_dict(), "data": run["summary"],
              "device": str(ctx.device), "world_size": ctx.world_size, "torch_version": torch.__version__,
              "best_metric": BEST_METRIC}
    if best is not None:
        config["best"] = {"epoch": best["epoch"], BEST_METRIC: best["score"],
                          "accuracy": best["metrics"].get("accuracy")}
    if ddp_check is not None:
        config["ddp_check"] = ddp_check
    if report is not None:
        config["report"] = report
    write_json(out_dir / "config.json", config)
    if history is not None:
        write_json(out_dir / "history.json", history)
