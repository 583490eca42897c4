"""ONNX Runtime's own profiler on every ONNX Runtime file of an export: the graph ORT actually runs after its
optimizations (fused, and on x86 re-laid out to NCHWc blocks), and how long each operator kind takes.

    python -m benchmarks.ort_profile --artifacts artifacts/ --out reports/ort_profile [--runs 20] [--threads 1]

Each file runs in a session with the toolkit's settings (CPU execution provider, ORT_ENABLE_ALL graph
optimizations, sequential execution, --threads intra-op threads) and ORT's profiling on, --runs times at batch 1
on the first image the export was verified on. Writes profile.md and profile.json (ms per run, the mean over runs).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import describe, machine_info
from benchmarks.profiling import profile_cli, profile_each, ranked
from train.errors import cli_errors


def profile_session(path: Path, x: np.ndarray, runs: int, threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort

    from export.runners import onnx_session_options

    so = onnx_session_options(threads)  # exactly what the export's verification and the benchmark run
    with tempfile.TemporaryDirectory(prefix="ortprof.") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x[:1], dtype=np.float32)}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return summarize(events, runs)


def summarize(events: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """ms per run: the whole run and each operator kind, with how many nodes of that kind ORT executes."""
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"nodes": 0, "ms": 0.0})
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            ops[op]["nodes"] += 1 / runs
            ops[op]["ms"] += e["dur"] / 1000 / runs
    run_ms = [e["dur"] / 1000 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    total = float(np.median(run_ms)) if run_ms else None
    rows = ranked({k: {**v, "nodes": round(v["nodes"])} for k, v in ops.items()}, total)
    return {"run_ms": round(total, 3) if total else None, "nodes_executed": sum(r["nodes"] for r in rows),
            "by_operator": rows}


def render(result: dict[str, Any]) -> str:
    lines = ["# ONNX Runtime profile (SessionOptions.enable_profiling)", "",
             f"CPU: {result['cpu']}; session: {result['session']}; {result['runs']} runs at batch 1 on "
             f"{result['input']}.", ""]
    for name, p in result["files"].items():
        lines += [f"## {name} ({p['file']})", "",
                  f"run {p['run_ms']} ms (median), {p['nodes_executed']} nodes after ORT's graph optimizations.", "",
                  "| operator as ORT runs it | nodes | ms per run | share |", "|---|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['nodes']} | {r['ms']:.3f} | {100 * (r['share'] or 0):.1f}% |"
                  for r in p["by_operator"]]
        lines.append("")
    return "\n".join(lines)


def run(artifacts: Path, runs: int = 20, threads: int | None = 1) -> dict[str, Any]:
    files, described = profile_each(artifacts, "onnxruntime", "ONNX Runtime file", profile_session, runs, threads)
    session = f"CPUExecutionProvider, ORT_ENABLE_ALL, sequential, {threads or 'default'} intra-op thread(s)"
    return {"cpu": describe(machine_info()), "session": session, "runs": runs, "input": described, "files": files}


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return profile_cli("python -m benchmarks.ort_profile", __doc__, "reports/ort_profile", run, render,
                       "intra-op threads (default 1; 0 = ORT's default)", argv)


if __name__ == "__main__":
    sys.exit(main())
