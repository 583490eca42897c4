"""ExecuTorch's own profiler on every .pte of an export: which operators run inside the XNNPACK delegate,
what runs outside it (ExecuTorch's portable kernels), and how long each takes.

    python -m benchmarks.executorch_profile --artifacts artifacts/ --out reports/executorch_profile [--runs 20] [--threads 1]

Each program is loaded by ExecuTorch's Python runtime with event tracing on (ETDump), run --runs times on the
first image the export was verified on, and the ETDump is read by `executorch.devtools.Inspector`: XNNPACK
reports one event per operator it executes, the runtime one per delegate call and per portable kernel.
Writes profile.md and profile.json (the median of each event over the runs; times in ms).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.machine import describe, machine_info
from export.manifest import entries, read_source
from export.registry import variant
from train.atomic import write_json, write_text
from train.errors import ToolkitError, cli_errors


class ProfileError(ToolkitError, ValueError):
    """An export folder without ExecuTorch programs, or a program the runtime cannot profile."""


def _input(artifacts: Path, entry: Any) -> tuple[np.ndarray, str]:
    """The first image the export was verified on (from artifacts.json's source block), else seeded noise."""
    from export.manifest import ManifestError
    from train.data import Sample, load_batch
    from train.spec import PreprocessSpec

    try:
        source = read_source(artifacts)
    except ManifestError:  # a single-format export writes no source block; the entry still has the spec
        source = {"spec": entry.details["spec"]}
    spec = PreprocessSpec.from_dict(source["spec"])
    images = [i["path"] if isinstance(i, dict) else i for i in source.get("eval_images") or []]
    if images and Path(images[0]).is_file():
        return load_batch([Sample(Path(images[0]), 0)], spec), f"{images[0]} ({source.get('eval_images_origin')})"
    rng = np.random.default_rng(0)  # timing does not depend on pixel values; the report says which input
    return rng.random((1, 3, spec.input_size, spec.input_size), dtype=np.float32), "seeded random input"


def profile_program(path: Path, x: np.ndarray, runs: int, threads: int | None) -> dict[str, Any]:
    """Median time per event over `runs` executions, grouped by operator kind."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from export.runners import ExecuTorchRunner

    if threads:
        ExecuTorchRunner._set_threads(threads)
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
    rows = sorted(({"op": k, **v, "ms": round(v["ms"], 3),
                    "share": round(v["ms"] / total, 4) if total else None} for k, v in ops.items()),
                  key=lambda r: -r["ms"])
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
    programs = [e for e in entries(artifacts) if variant(e.name).runtime == "executorch" and e.path]
    if not programs:
        raise ProfileError(f"--artifacts {artifacts}: artifacts.json lists no ExecuTorch program; export with "
                           f"`python -m export --formats executorch` first")
    x, described = _input(artifacts, programs[0])
    out = {}
    for e in programs:
        out[e.name] = {"file": e.path, **profile_program(artifacts / e.path, x, runs, threads)}
        print(f"{e.name}: forward {out[e.name]['forward_ms']} ms, outside the delegate "
              f"{out[e.name]['outside_delegate_ms']} ms", flush=True)
    return {"cpu": describe(machine_info()), "threads": threads, "runs": runs, "input": described, "programs": out}


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.executorch_profile", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="export folder (default artifacts/)")
    p.add_argument("--out", type=Path, default=Path("reports/executorch_profile"), help="report folder")
    p.add_argument("--runs", type=int, default=20, help="profiled executions per program (default 20)")
    p.add_argument("--threads", type=int, default=1, help="XNNPACK threads (default 1; 0 = ExecuTorch's default)")
    a = p.parse_args(argv)
    if a.runs < 1:
        raise ProfileError(f"--runs must be at least 1, got {a.runs}")
    result = run(a.artifacts, a.runs, a.threads or None)
    write_json(a.out / "profile.json", result)
    write_text(a.out / "profile.md", render(result))
    print(f"wrote {a.out / 'profile.md'} and profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
