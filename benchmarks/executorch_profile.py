"""ExecuTorch's own profiler on every .pte of an export: which operators run inside the XNNPACK delegate,
what runs outside it (ExecuTorch's portable kernels), and how long each takes.

    python -m benchmarks.executorch_profile --artifacts artifacts/ --out reports/executorch_profile [--runs 20] [--threads 1]

Each program is loaded by ExecuTorch's Python runtime with event tracing on (ETDump), run --runs times on the
first image the export was verified on, and the ETDump is read by `executorch.devtools.Inspector`: XNNPACK
reports one event per operator it executes, the runtime one per delegate call and per portable kernel.
Writes profile.md and profile.json (the median of each event over the runs; times in ms).
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import describe, machine_info
from benchmarks.profiling import profile_cli, profile_each, ranked
from train.errors import cli_errors


def profile_program(path: Path, x: np.ndarray, runs: int, threads: int | None) -> dict[str, Any]:
    """Median time per event over `runs` executions, grouped by operator kind."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from export.runners import ExecuTorchRunner

    if threads:
        ExecuTorchRunner._set_threads(ExecuTorchRunner.bindings(), threads)
    module = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    inp = [torch.from_numpy(np.ascontiguousarray(x[:1]))]  # the runtime ignores strides: contiguous only
    for _ in range(runs):
        module.forward(inp)
    with tempfile.TemporaryDirectory(prefix="etdump.") as tmp:
        etdump = Path(tmp) / "profile.etdp"
        module.write_etdump_result_to_file(str(etdump))
        df = Inspector(etdump_path=str(etdump)).to_dataframe()
    return summarize(df)


def summarize(df: Any) -> dict[str, Any]:
    """ms per run: the whole `forward`, the delegate calls, the time outside them, and per operator kind."""
    p50 = "p50 (ms)"
    by_name = {r.event_name: float(r[p50]) for _, r in df.iterrows()}
    executed = df[df["event_block_name"] == "Execute"]
    ops: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "ms": 0.0, "in_delegate": True})
    for _, r in executed.iterrows():
        name = str(r.event_name)
        if name in ("DELEGATE_CALL", "Method::execute"):
            continue
        kind = re.sub(r" #\d+$", "", name)
        ops[kind]["count"] += 1
        ops[kind]["ms"] += float(r[p50])
        ops[kind]["in_delegate"] = bool(r.is_delegated_op)
    total = by_name.get("Method::execute")
    delegate = float(executed[executed.event_name == "DELEGATE_CALL"][p50].sum())
    rows = ranked(ops, total)
    outside = [r["op"] for r in rows if not r["in_delegate"]]
    return {"forward_ms": round(total, 3) if total else None, "delegate_calls_ms": round(delegate, 3),
            "outside_delegate_ms": round(total - delegate, 3) if total else None,
            "ops_outside_delegate": outside, "by_operator": rows}


def render(result: dict[str, Any]) -> str:
    lines = ["# ExecuTorch profile (ETDump, devtools Inspector)", "",
             f"CPU: {result['cpu']}; threads: {result['threads'] or 'ExecuTorch default'}; "
             f"{result['runs']} runs on {result['input']}; median per event.", ""]
    for name, p in result["programs"].items():
        lines += [f"## {name} ({p['file']})", "",
                  f"forward {p['forward_ms']} ms: {p['delegate_calls_ms']} ms in XNNPACK delegate calls, "
                  f"{p['outside_delegate_ms']} ms outside them; operators outside the delegate: "
                  f"{', '.join(p['ops_outside_delegate']) or 'none'}.", "",
                  "| operator (XNNPACK kernel) | count | ms | share of forward |", "|---|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['count']} | {r['ms']:.3f} | {100 * (r['share'] or 0):.1f}% |"
                  for r in p["by_operator"]]
        lines.append("")
    return "\n".join(lines)


def run(artifacts: Path, runs: int = 20, threads: int | None = 1) -> dict[str, Any]:
    programs, described = profile_each(artifacts, "executorch", "ExecuTorch program", profile_program, runs, threads)
    return {"cpu": describe(machine_info()), "threads": threads, "runs": runs, "input": described,
            "programs": programs}


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return profile_cli("python -m benchmarks.executorch_profile", __doc__, "reports/executorch_profile", run, render,
                       "XNNPACK threads (default 1; 0 = ExecuTorch's default)", argv)


if __name__ == "__main__":
    sys.exit(main())
