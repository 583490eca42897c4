"""`python -m benchmarks.ratios`: the runtime ratios of `python -m benchmarks`, timed with the files taking turns.

`python -m benchmarks` times each file in its own fresh process, one after another, so on a shared machine a
burst of load from another tenant lands on whichever files ran then: the same `.ptl` measured 1.23x and 1.42x
ONNX Runtime's latency in two runs an hour apart. Here every file is loaded once in its own runtime, in one process
at 1 thread, and within each round every file runs once on the same real image, so contention spreads over all
of them and the ratios (float file / ONNX Runtime's `model.onnx`, int8 file / its own float file) hold still.
The figures are latency only; size, memory and accuracy stay with `python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from train.errors import cli_errors

DEFAULT_OUT = Path("reports/ratios")


def load_runners(rows: list[dict[str, Any]], x: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Every measurable row's file loaded in its own runtime at 1 thread and run once on `x`, by row name; and why
    each other row is not timed (failed in the export, altered since, no runner here, does not load or run)."""
    from tqdm import tqdm

    from export.runners import get_runner

    runners, skipped = {}, {}
    for r in tqdm(rows, desc="loading", unit="file"):
        if not r.get("job"):
            skipped[r["name"]] = r.get("reason") or r.get("note") or "not runnable here"
            continue
        try:
            runner = get_runner(r["job"]["runtime"], threads=1, engine=r["job"]["engine"]).load(r["job"]["path"])
        except Exception as err:  # a file that does not load is reported, and the others are still timed
            skipped[r["name"]] = f"does not load: {type(err).__name__}: {str(err).strip()[:200]}"
            continue
        try:
            runner.run(x)
        except Exception as err:  # e.g. another checkpoint's file of another input size in the same folder
            skipped[r["name"]] = f"does not run on this input: {type(err).__name__}: {str(err).strip()[:200]}"
            continue
        runners[r["name"]] = runner
    return runners, skipped


def measure(artifacts: Path, checkpoint: Path, rounds: int, warmup: int) -> dict[str, Any]:
    """Latency percentiles per file from interleaved rounds, and the ratios with their targets."""
    from benchmarks.machine import machine_info
    from benchmarks.profiling import first_input
    from benchmarks.roofline import gemm_ceiling
    from benchmarks.run import BenchmarkError, plan_rows
    from benchmarks.summary import runtime_ratios
    from benchmarks.timing import time_interleaved
    from train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    rows = plan_rows(artifacts, checkpoint, ckpt, None)
    x, described = first_input(artifacts, ckpt.spec.to_dict())  # one float32 image, (1, 3, H, W)
    machine = machine_info()  # before any timing: it records the load average at the start
    runners, skipped = load_runners(rows, x)
    if not runners:
        raise BenchmarkError(f"--artifacts {artifacts}: no file could be timed ({skipped})")
    print(f"timing {len(runners)} files, {rounds} rounds, each file once per round", flush=True)
    latency = time_interleaved({name: (lambda r=runner: r.run(x)) for name, runner in runners.items()},
                               runs=rounds, warmup=warmup)
    measured = [{**{k: r[k] for k in ("name", "precision", "runtime", "engine", "status")}, "measured": True,
                 "latency_1t": latency[r["name"]], **({"note": r["note"]} if r.get("note") else {})}
                for r in rows if r["name"] in latency]
    machine["gemm_ceiling"] = gemm_ceiling()
    return {"artifacts_dir": str(artifacts), "checkpoint": str(checkpoint), "input": described, "rounds": rounds,
            "warmup": warmup, "machine": machine, "rows": measured, "not_timed": skipped,
            "runtime_ratios": runtime_ratios(measured, machine, ckpt.spec.input_size)}


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.machine import describe
    from benchmarks.report import ratio_table

    lines = ["# Runtime ratios, files taking turns", "",
             f"Machine: {describe(result['machine'])}. One process, 1 thread per runtime; {result['warmup']} warm-up "
             f"runs per file, then {result['rounds']} rounds in which every file runs once at batch 1 on "
             f"{result['input']}.", "",
             "| artifact | runtime (engine) | p50 ms | min ms | p90 ms |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lat = r["latency_1t"]
        lines.append(f"| {r['name']} | {r['runtime']} ({r.get('engine') or 'default'}) | {lat['p50_ms']:.2f} | "
                     f"{lat['min_ms']:.2f} | {lat['p90_ms']:.2f} |")
    lines += [""] + [f"Note: `{r['name']}`: {r['note']}" for r in result["rows"] if r.get("note")]
    lines += [f"Not timed: `{name}`: {why}" for name, why in result.get("not_timed", {}).items()]
    return "\n".join(lines + ratio_table(result) + [""])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ratios", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="export folder (default artifacts/)")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the files were exported from")
    p.add_argument("--rounds", type=int, default=40, help="rounds in which every file runs once (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per file first (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.run import BenchmarkError
    from export.manifest import manifest_path
    from benchmarks.report import write_md_and_json
    from train.atomic import check_writable_dir

    a = build_parser().parse_args(argv)
    check_writable_dir(a.out)
    if a.rounds < 1 or a.warmup < 0:
        raise BenchmarkError(f"--rounds must be >= 1 and --warmup >= 0 (got {a.rounds}, {a.warmup})")
    if not manifest_path(a.artifacts).is_file():
        raise BenchmarkError(f"--artifacts {a.artifacts}: no {manifest_path(a.artifacts).name} there; run "
                             f"`python -m export --checkpoint CKPT --out {a.artifacts}` first")
    result = measure(a.artifacts, a.checkpoint, a.rounds, a.warmup)
    print(markdown(result))
    write_md_and_json(a.out, "ratios", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
