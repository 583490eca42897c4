"""`python -m benchmarks.pipeline`: the whole toolkit in one command on built-in SYNTHETIC data.

Generate data -> train a small model -> export every format -> write the Flutter bundle -> quantization
report -> benchmark every artifact -> print the table. Everything goes under --out (default runs/demo), so
the demo never touches the repo's artifacts/ or mobile_assets/. A stage that fails is reported with its
reason; the stages that need its output are skipped, the others still run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from train.atomic import check_writable_dir, write_json, write_text
from train.cpu import fit_torch_threads
from train.memory import keep_freed_memory
from train.errors import ToolkitError, cli_errors

log = logging.getLogger(__name__)

OWNED = ("data", "run", "artifacts", "mobile_assets", "reports", "pipeline.json", "pipeline.md")
MARKER = ".pipeline-run"  # written first: a folder holding it (or pipeline.json) is a pipeline run's


class PipelineError(ToolkitError, ValueError):
    """A pipeline that cannot start as asked; the message names the flag."""


class PartlyFailed(Exception):
    """A stage that did its work but not all of it (a format that failed to export, an artifact that failed to
    run): the stages after it still run on the rest, and the pipeline is not 'ok'."""


@dataclass
class Context:
    """Paths and settings shared by the stages, plus what earlier stages produced."""

    out: Path
    args: dict[str, Any]
    data: Path | None = None
    checkpoint: Path | None = None
    eval_data: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)


def stage_data(ctx: Context) -> str:
    from train.synthetic import make_synthetic_dataset

    ctx.data = make_synthetic_dataset(ctx.out / "data", per_class=ctx.args["per_class"],
                                      size=ctx.args["input_size"], seed=0)
    return f"{ctx.args['per_class']} SYNTHETIC images per class in {ctx.data}"


def stage_train(ctx: Context) -> str:
    from train.loop import train_model

    ctx.checkpoint = train_model(ctx.data, ctx.out / "run", epochs=ctx.args["epochs"], batch_size=16, lr=2e-3,
                                 weights="none", input_size=ctx.args["input_size"], seed=0, device="cpu",
                                 workers=0, progress=ctx.args["progress"], evaluate=False)
    splits = ctx.out / "run" / "splits.csv"
    ctx.eval_data = splits if splits.is_file() else ctx.data  # the exact split training used
    return f"best checkpoint {ctx.checkpoint}"


def stage_export(ctx: Context) -> str:
    from export.manifest import record_source
    from export.parallel import resolve_jobs
    from export.pipeline import export_all, source_record
    from export.registry import FORMATS
    from train.checkpoint import load_checkpoint
    from train.data import verification_sets

    ckpt = load_checkpoint(ctx.checkpoint)
    eval_samples, calib_samples = verification_sets(ctx.eval_data, ckpt.spec.class_names, 64, 32)
    (ctx.out / "artifacts").mkdir(parents=True, exist_ok=True)
    record_source(ctx.out / "artifacts", source_record(ckpt, ctx.eval_data, eval_samples))
    only = ctx.args["formats"]
    done = export_all(ckpt, ctx.out / "artifacts", eval_samples=eval_samples, calib_samples=calib_samples,
                      only=only, jobs=resolve_jobs("auto", len(only or FORMATS)))
    ok = [e.name for e in done if e.status != "failed"]
    bad = [f"{e.name} ({(e.error or '')[:80]})" for e in done if e.status == "failed"]
    ctx.results["export"] = {"ok": ok, "failed": bad, "statuses": {e.name: e.status for e in done}}
    verified = sum(e.status == "verified" for e in done)
    detail = (f"{len(ok)} artifacts written, {verified} verified (SYNTHETIC images: the demo's files are "
              f"'exported', never 'verified')")
    if bad:
        raise PartlyFailed(f"{detail}; failed: {', '.join(bad)}")
    return detail


def stage_bundle(ctx: Context) -> str:
    from mobile_assets.bundle import write_bundle

    path = write_bundle(ctx.out / "artifacts", ctx.args["bundle_dir"] or ctx.out / "mobile_assets", force=True,
                        allow_unverified=True)  # the SYNTHETIC demo: its manifest marks every model 'exported'
    return f"Flutter bundle in {path} (SYNTHETIC demo: models are 'exported', not verified on real X-rays)"


def stage_quantize(ctx: Context) -> str:
    from benchmarks.quant_report import run_quantization_report

    out = ctx.out / "reports" / "quantize"
    run_quantization_report(ctx.checkpoint, ctx.eval_data, split="val", out_dir=out, calib_size=64,
                            latency_runs=10, threads=2, progress=ctx.args["progress"])
    return f"quantization report in {out}"


def stage_benchmark(ctx: Context) -> str:
    from benchmarks.run import run_benchmarks

    out = ctx.out / "reports" / "benchmarks"
    ctx.results["benchmark"] = run_benchmarks(
        ctx.out / "artifacts", ctx.checkpoint, ctx.eval_data, split="val", out_dir=out, runs=ctx.args["runs"],
        warmup=3, progress=ctx.args["progress"], command="python -m benchmarks.pipeline (stage benchmark)")
    rows = ctx.results["benchmark"]["rows"]
    failed = [f"{r['name']} ({str(r.get('reason', ''))[:80]})" for r in rows if r["status"] == "failed"]
    detail = f"benchmark report in {out}: {sum(bool(r.get('measured')) for r in rows)} of {len(rows)} rows measured"
    if failed:
        raise PartlyFailed(f"{detail}; failed: {', '.join(failed)}")
    return detail


STAGES: list[tuple[str, Callable[[Context], str], tuple[str, ...]]] = [
    ("data", stage_data, ()),
    ("train", stage_train, ("data",)),
    ("export", stage_export, ("train",)),
    ("bundle", stage_bundle, ("export",)),
    ("quantize", stage_quantize, ("train",)),
    ("benchmark", stage_benchmark, ("export",)),
]


def run_stage(name: str, fn: Callable[[Context], str], ctx: Context) -> dict[str, Any]:
    """Run one stage; a stage that raises is a 'failed' report line (with the reason), not a crash of the demo."""
    print(f"\n=== stage {name} ===", flush=True)
    t0 = time.perf_counter()
    try:
        detail, status = fn(ctx), "ok"
    except PartlyFailed as err:
        detail, status = str(err), "partly failed"
    except Exception as err:  # a failing stage is a report line, not a crash of the whole demo
        detail, status = f"{type(err).__name__}: {str(err).strip()[:500]}", "failed"
        log.debug("%s", traceback.format_exc())
    seconds = time.perf_counter() - t0
    print(f"=== stage {name}: {status} in {seconds:.1f} s: {detail}", flush=True)
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "detail": detail}


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to mix with an earlier run unless --force, which removes only the pipeline's own outputs."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; choose a folder")
    present = [n for n in OWNED if (out / n).exists()]
    if present and not ((out / MARKER).exists() or (out / "pipeline.json").exists()):
        raise PipelineError(f"--out {out} holds {', '.join(present)}, not known to be a pipeline run's (no "
                            f"pipeline.json or {MARKER}); the pipeline would replace them: choose another --out, or "
                            f"remove them yourself where an earlier, interrupted pipeline wrote them")
    if present and not force:
        raise PipelineError(f"--out {out} already holds a pipeline run ({', '.join(present)}); pass --force to "
                            f"replace it or choose another --out")
    for n in present:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("python -m benchmarks.pipeline writes and replaces data/, run/, artifacts/, "
                              "mobile_assets/, reports/ and pipeline.{json,md} in this folder\n")


def run_pipeline(out: Path = Path("runs/demo"), *, epochs: int = 2, per_class: int = 40, input_size: int = 64,
                 runs: int = 10, force: bool = False, bundle_dir: Path | None = None,
                 progress: bool = True, formats: Sequence[str] | None = None) -> dict[str, Any]:
    """Every stage in order; returns and writes (<out>/pipeline.json, pipeline.md) the stage summary.
    `formats` (default every registered one) limits what the export stage writes."""
    if epochs < 1 or per_class < 10 or input_size < 32 or runs < 1:
        raise PipelineError("--epochs must be >= 1, --per-class >= 10 (a split needs a few per class), "
                            "--input-size >= 32 (ResNet-18 downsamples 32x) and --runs >= 1")
    if formats is not None:
        from export.registry import get_format

        formats = [get_format(f).name for f in formats]  # an unknown name fails before any work
    prepare_out(out, force)
    ctx = Context(out=out, args={"epochs": epochs, "per_class": per_class, "input_size": input_size, "runs": runs,
                                 "bundle_dir": bundle_dir, "progress": progress, "formats": formats})
    t0, done, stages = time.perf_counter(), set(), []
    for name, fn, needs in STAGES:
        missing = [n for n in needs if n not in done]
        if missing:
            stages.append({"stage": name, "status": "skipped", "seconds": 0.0,
                           "detail": f"needs stage {', '.join(missing)}"})
            print(f"=== stage {name}: skipped (needs {', '.join(missing)})", flush=True)
            continue
        stages.append(run_stage(name, fn, ctx))
        if stages[-1]["status"] in ("ok", "partly failed"):
            done.add(name)
    summary = {"out": str(out), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in ctx.args.items()},
               "wall_s": round(time.perf_counter() - t0, 1), "stages": stages,
               "ok": all(s["status"] == "ok" for s in stages)}
    write_json(out / "pipeline.json", summary)
    write_text(out / "pipeline.md", summary_markdown(summary))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Pipeline on SYNTHETIC data: {'all stages ok' if summary['ok'] else 'NOT EVERY STAGE RAN OK'}",
             "", f"Wall time {summary['wall_s']:.0f} s. Outputs under {summary['out']}.", "",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {s['detail'].replace('|', '/')} |"
              for s in summary["stages"]]
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything (default runs/demo)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8: enough to learn the synthetic task)")
    p.add_argument("--per-class", type=int, default=60, help="synthetic images per class (default 60)")
    p.add_argument("--input-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per latency figure (default 10)")
    p.add_argument("--bundle-dir", type=Path, default=None,
                   help="where the Flutter bundle goes (default <out>/mobile_assets; the repo's is mobile_assets/)")
    p.add_argument("--formats", help="comma-separated formats to export (default: every registered one)")
    p.add_argument("--force", action="store_true", help="replace an earlier pipeline run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    check_writable_dir(a.out)
    if a.bundle_dir is not None:
        check_writable_dir(a.bundle_dir, "--bundle-dir")
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    fit_torch_threads()
    keep_freed_memory()  # training, export and calibration here; the benchmark's workers keep glibc's defaults
    try:
        summary = run_pipeline(a.out, epochs=a.epochs, per_class=a.per_class, input_size=a.input_size, runs=a.runs,
                               force=a.force, bundle_dir=a.bundle_dir, progress=not a.quiet,
                               formats=[f.strip() for f in a.formats.split(",") if f.strip()] if a.formats else None)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = a.out / "reports" / "benchmarks" / "report.md"
    if report.is_file():
        print("\n" + report.read_text(encoding="utf-8"))
    print(summary_markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
