"""What the runtime profilers (benchmarks.executorch_profile, benchmarks.ort_profile) share: the input they
time, their errors and their command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.report import write_md_and_json
from export.manifest import ManifestError, entries, read_source, verify_file
from export.registry import variant
from train.atomic import check_writable_dir
from train.errors import ToolkitError


class ProfileError(ToolkitError, ValueError):
    """An export folder without the files a profiler reads, or a --runs below 1; the message says what to do."""


def first_input(artifacts: Path, spec: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The first image the export was verified on (from artifacts.json's source block), else seeded noise
    preprocessed by `spec` (a single-format export writes no source block)."""
    from train.data import Sample, load_batch
    from train.spec import PreprocessSpec

    try:
        source = read_source(artifacts)
    except ManifestError:
        source = {"spec": spec}
    spec = PreprocessSpec.from_dict(source["spec"])
    images = [i["path"] if isinstance(i, dict) else i for i in source.get("eval_images") or []]
    if images and Path(images[0]).is_file():
        return load_batch([Sample(Path(images[0]), 0)], spec), f"{images[0]} ({source.get('eval_images_origin')})"
    rng = np.random.default_rng(0)  # timing does not depend on pixel values; the report says which input
    return rng.random((1, 3, spec.input_size, spec.input_size), dtype=np.float32), "seeded random input"


def ranked(ops: dict[str, dict[str, Any]], total_ms: float | None) -> list[dict[str, Any]]:
    """Per-operator rows, slowest first, with ms rounded and each one's share of the whole run."""
    rows = [{"op": k, **v, "ms": round(v["ms"], 3), "share": round(v["ms"] / total_ms, 4) if total_ms else None}
            for k, v in ops.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_each(artifacts: Path, runtime: str, what: str, profile: Callable[..., dict[str, Any]], runs: int,
                 threads: int | None) -> tuple[dict[str, dict[str, Any]], str]:
    """`profile(path, x, runs, threads)` for every file of `runtime` in artifacts.json, on one input; returns
    ({entry: figures}, a description of the input)."""
    if not (Path(artifacts) / "artifacts.json").is_file():
        raise ProfileError(f"--artifacts {artifacts}: no artifacts.json there; export first (`python -m export`) "
                           f"or point --artifacts at the export folder")
    chosen = [e for e in entries(artifacts) if variant(e.name).runtime == runtime and e.path]
    if not chosen:
        raise ProfileError(f"--artifacts {artifacts}: artifacts.json lists no {what}; export one with "
                           f"`python -m export` first")
    x, described = first_input(artifacts, chosen[0].details["spec"])
    out = {}
    for e in chosen:  # each file as artifacts.json records it: a missing or changed one is named, not profiled
        out[e.name] = {"file": e.path, **profile(verify_file(artifacts, e), x, runs, threads)}
        ms = out[e.name].get("forward_ms", out[e.name].get("run_ms"))
        print(f"{e.name}: {ms} ms per run (median)", flush=True)
    return out, described


def profile_cli(prog: str, doc: str, default_out: str, run: Callable[..., dict[str, Any]],
                render: Callable[[dict[str, Any]], str], threads_help: str,
                argv: Sequence[str] | None) -> int:
    """The command line both profilers share: --artifacts, --out, --runs, --threads; profile.md and .json."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="export folder (default artifacts/)")
    p.add_argument("--out", type=Path, default=Path(default_out), help=f"report folder (default {default_out})")
    p.add_argument("--runs", type=int, default=20, help="profiled runs per file (default 20)")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    a = p.parse_args(argv)
    check_writable_dir(a.out)
    if a.runs < 1:
        raise ProfileError(f"--runs must be at least 1, got {a.runs}")
    result = run(a.artifacts, a.runs, a.threads or None)
    write_md_and_json(a.out, "profile", result, render(result))
    return 0
