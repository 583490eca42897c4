"""`run_benchmarks`: every artifact in the manifest, plus the float PyTorch model, measured side by side.

Each artifact runs in its own runtime (export.runners) in a fresh child process (benchmarks.worker) on the
same evaluation images, loaded once here. A missing or altered file, an artifact that does not load, a
crashed or timed-out worker, or data whose classes differ from the model's each become a failed row
with the reason; the other rows are still measured.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.metrics import compressed_size, score_rows
from export.manifest import ArtifactEntry, ManifestError, entries, manifest_path, verify_file
from export.registry import variants
from export.runners import RUNNERS
from train.atomic import size_bytes
from train.checkpoint import Checkpoint, load_checkpoint
from train.cpu import usable_cores
from train.errors import ToolkitError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BASELINE = "pytorch_fp32"


class BenchmarkError(ToolkitError, ValueError):
    """Inputs the benchmark cannot start from (no manifest, no images); the message says what to do."""


def load_eval_set(ckpt: Checkpoint, data: str | Path, split: str, max_images: int | None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Images (float32 [0,1]) and labels in the model's class order; info['class_error'] is set (and the
    labels are empty) when the data's classes differ from the model's."""
    from train.checkpoint import training_split
    from train.data import discover, labelled_splits, load_batch, seeded_subset

    data = training_split(ckpt, data)
    model_classes = tuple(ckpt.spec.class_names)
    found = discover(data).class_names
    info: dict[str, Any] = {"data": str(data), "split": split, "data_classes": list(found),
                            "model_classes": list(model_classes), "class_error": None}
    if set(found) != set(model_classes):
        info["class_error"] = (f"data classes {list(found)} differ from the model's "
                               f"{list(model_classes)}; accuracy cannot be scored")
    idx = labelled_splits(data, None if info["class_error"] else model_classes, seed=seed)
    if idx.split_generated:
        info["split_note"] = f"the data has no split column; a seeded stratified split (seed {seed}) was made"
    samples = idx.require_split(split)
    if max_images and len(samples) > max_images:
        samples = seeded_subset(samples, max_images, seed=seed)
    images = load_batch(samples, ckpt.spec)
    labels = np.asarray([] if info["class_error"] else [s.label for s in samples], dtype=np.int64)
    info.update(n_images=len(samples), input_size=ckpt.spec.input_size,
                counts={c: int(sum(s.label == i for s in samples)) for i, c in enumerate(idx.class_names)})
    return images, labels, info


def _row(name: str, **fields: Any) -> dict[str, Any]:
    base = {"name": name, "format": None, "precision": None, "runtime": None, "engine": None,
            "status": None, "reason": None, "note": None, "path": None, "size_bytes": None,
            "gzip_bytes": None, "measured": False, "job": None}
    base.update(fields)
    return base


def entry_rows(artifacts_dir: Path, entry: ArtifactEntry, ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The row(s) one manifest entry becomes; rows with a `job` are measured in a worker."""
    known = variants().get(entry.name)
    row = _row(entry.name, format=entry.format, precision=entry.precision, runtime=entry.runtime,
               batch=known.batch if known else "dynamic",
               engine=entry.engine, status=entry.status, manifest_status=entry.status,
               manifest_verification=entry.verification)
    if entry.status == "failed":
        return [{**row, "reason": f"export failed: {entry.error or 'no reason recorded'}"}]
    try:
        path = verify_file(artifacts_dir, entry)
    except ManifestError as err:
        return [{**row, "status": "failed", "reason": str(err)}]
    row.update(path=str(path), size_bytes=size_bytes(path))
    if entry.source_checkpoint_sha256 and ckpt.sha256 and entry.source_checkpoint_sha256 != ckpt.sha256:
        row["note"] = "exported from a different checkpoint than --checkpoint"
    if entry.runtime not in RUNNERS:
        return [{**row, "note": f"no in-process runner for {entry.runtime} (a served artifact: see the TorchServe "
                                f"load test, benchmarks.serve_load)"}]
    unavailable = RUNNERS[entry.runtime].unavailable_reason()
    if unavailable:
        v = entry.verification or {}
        return [{**row, "note": f"not executed: {unavailable.split(';')[0]}; figures from the export check: "
                 f"{v.get('method', '-')}", "top1_agreement_manifest": v.get("top1_agreement")}]
    rows = [{**row, "job": {"runtime": entry.runtime, "path": str(path), "engine": entry.engine}}]
    if entry.runtime == "pytorch-lite" and entry.engine == "qnnpack" and platform.machine() in ("x86_64", "AMD64"):
        rows.append({**row, "name": f"{entry.name}@x86", "engine": "x86",
                     "note": "same file, run with the x86 quantized engine instead of qnnpack (server-like)",
                     "job": {"runtime": entry.runtime, "path": str(path), "engine": "x86"}})
    return rows


def plan_rows(artifacts_dir: Path, checkpoint: Path, ckpt: Checkpoint,
              only: Sequence[str] | None) -> list[dict[str, Any]]:
    """Baseline first, then the manifest's entries (filtered by --only)."""
    rows = [_row(BASELINE, format="pytorch checkpoint", precision="fp32", runtime="torch-eager",
                 status="baseline", path=str(checkpoint), size_bytes=size_bytes(checkpoint),
                 note="float PyTorch model (eager) built from the checkpoint: the reference",
                 job={"runtime": "torch-eager", "path": str(checkpoint), "engine": None})]
    listed = entries(artifacts_dir)
    if only:
        unknown = sorted(set(only) - {e.name for e in listed} - {BASELINE})
        if unknown:
            raise BenchmarkError(f"--only {','.join(unknown)}: not in {manifest_path(artifacts_dir)}; "
                                 f"known: {', '.join(e.name for e in listed)}")
        listed = [e for e in listed if e.name in only]
    for entry in listed:
        rows += entry_rows(artifacts_dir, entry, ckpt)
    return rows


def run_worker(job: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """One fresh interpreter per artifact; a crash or timeout is a result with ok=False. The worker runs in the
    toolkit's folder, so that a folder of the user's named like one of its packages (`export/`) cannot stand in
    for it: every path it is handed is made absolute here, or a relative `--artifacts` would point elsewhere."""
    job = {**job, **{key: str(Path(job[key]).resolve()) for key in ("path", "images", "logits_out") if job.get(key)}}
    job_file = work / f"{job['id']}.job.json"
    out_file = work / f"{job['id']}.result.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "benchmarks.worker", str(job_file), str(out_file)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"worker timed out after {timeout:.0f} s (raise --timeout)"}
    if out_file.exists():
        return json.loads(out_file.read_text(encoding="utf-8"))
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"ok": False, "error": f"worker crashed (exit code {proc.returncode}): {tail[0][:300]}"}


def sharded_eval(base: dict[str, Any], job_id: str, work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The accuracy pass of a runtime that gains nothing from more threads: one 1-thread worker per core, each
    on its shard of the images, all at once. Logits are joined in image order; throughput is their sum."""
    from concurrent.futures import ThreadPoolExecutor

    rows = np.load(base["images"], mmap_mode="r").shape[0]
    n = max(1, min(int(settings["threads_all"]), rows))  # no worker without images (--max-images below cores)
    jobs = [{**base, "id": f"{job_id}-eval{k}", "phase": "eval", "shard": [k, n],
             "logits_out": str(work / f"{job_id}-{k}.logits.npy")} for k in range(n)]
    with ThreadPoolExecutor(n) as pool:  # the threads only wait on the worker processes
        parts = list(pool.map(lambda job: run_worker(job, work, settings["timeout"]), jobs))
    failed = [p for p in parts if not p.get("ok")]
    if failed:
        return {"ok": False, "error": f"sharded accuracy pass: {failed[0].get('error')}"}
    np.save(base["logits_out"], np.concatenate([np.load(job["logits_out"]) for job in jobs]))
    return {"throughput_ips": sum(p["throughput_ips"] for p in parts),
            "throughput_images": sum(p["throughput_images"] for p in parts),
            "throughput_batch": max(p["throughput_batch"] for p in parts), "eval_processes": n,
            "peak_rss_eval_mb": max(p["peak_rss_mb"] for p in parts)}


def measure_rows(rows: list[dict[str, Any]], images_file: Path, work: Path, settings: dict[str, Any],
                 num_classes: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Run every row that has a job, one worker after another; returns logits by row name."""
    from tqdm import tqdm

    logits: dict[str, np.ndarray] = {}
    todo = [r for r in rows if r["job"]]
    for i, row in enumerate(tqdm(todo, desc="benchmarking", unit="artifact", disable=not progress)):
        base = {**row["job"], "images": str(images_file), "logits_out": str(work / f"{i}.logits.npy"),
                "num_classes": num_classes, "min_throughput_images": 2 * settings["batch"],
                **{k: settings[k] for k in ("runs", "warmup", "threads_all", "batch")}}
        log.info("measuring %s in %s (%s)", row["name"], base["runtime"], base.get("engine") or "default")
        t0 = time.perf_counter()
        res = run_worker({**base, "id": str(i)}, work, settings["timeout"])
        if res.get("ok") and res.pop("eval", None) == "sharded":
            res.update(sharded_eval(base, f"{i}", work, settings))
        row["worker_wall_s"] = round(time.perf_counter() - t0, 2)
        row["measured"] = bool(res.get("ok"))
        if not res.get("ok"):
            row.update(status="failed", reason=f"benchmark: {res.get('error')}")
            continue
        res.pop("ok", None)
        row.update({k: v for k, v in res.items() if k not in ("traceback", "pid")})
        fixed = row["batch"] if row.get("batch", "dynamic") != "dynamic" else None
        row["throughput_mode"] = f"looped batch {fixed}" if fixed else f"batch {res['throughput_batch']}"
        if res.get("eval_processes"):
            row["throughput_mode"] += f", {res['eval_processes']} processes x 1 thread"
        logits[row["name"]] = np.load(base["logits_out"])
    return logits


def add_gzip_sizes(rows: list[dict[str, Any]], threads: int) -> None:
    """Each row's gzip size, files compressed side by side once every timing is done (zlib releases the GIL;
    one at a time this took 12 s of a benchmark of 19 files)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted({row["path"] for row in rows if row["path"] and Path(row["path"]).exists()})
    with ThreadPoolExecutor(max(1, threads)) as pool:
        sizes = dict(zip(paths, pool.map(lambda p: compressed_size(Path(p)), paths)))
    for row in rows:
        if row["path"] in sizes:
            row["gzip_bytes"] = sizes[row["path"]]


def run_benchmarks(artifacts_dir: str | Path, checkpoint: str | Path, data: str | Path, *, split: str = "val",
                   out_dir: str | Path = Path("reports/benchmarks"), max_images: int | None = None,
                   runs: int = 50, warmup: int = 5, threads_all: int | None = None, batch: int = 32,
                   max_drop: float = 1.0, only: Sequence[str] | None = None, timeout: float = 900.0,
                   progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Measure every artifact and write report.md/json/csv/png into out_dir; returns the JSON dict."""
    from benchmarks.machine import machine_info
    from benchmarks.report import write_reports
    from benchmarks.roofline import gemm_ceiling

    artifacts_dir, checkpoint, out_dir = Path(artifacts_dir), Path(checkpoint), Path(out_dir)
    if not manifest_path(artifacts_dir).is_file():
        raise BenchmarkError(f"--artifacts {artifacts_dir}: no {manifest_path(artifacts_dir).name} there; "
                             f"run `python -m export --checkpoint CKPT --out {artifacts_dir}` first")
    if runs < 1 or warmup < 0 or batch < 1:
        raise BenchmarkError(f"--runs must be >= 1, --warmup >= 0 and batch >= 1 (got {runs}, {warmup}, {batch})")
    ckpt = load_checkpoint(checkpoint)
    images, labels, data_info = load_eval_set(ckpt, data, split, max_images)
    rows = plan_rows(artifacts_dir, checkpoint, ckpt, only)
    if data_info["class_error"]:  # nothing can be scored; timing artifacts on unusable data helps no one
        for row in rows:
            if row["job"]:
                row.update(status="failed", reason=data_info["class_error"], job=None)
    if not threads_all:
        threads_all = usable_cores()
    settings = {"runs": runs, "warmup": warmup, "threads_all": int(threads_all or 1), "batch": batch,
                "timeout": timeout, "max_drop": max_drop, "max_images": max_images, "niceness": os.nice(0)}
    machine = machine_info()  # before the workers: the report quotes the load average at the start
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        work = Path(tmp)
        images_file = work / "images.npy"
        np.save(images_file, images)
        logits = measure_rows(rows, images_file, work, settings, ckpt.spec.num_classes, progress)
    machine["gemm_ceiling"] = gemm_ceiling()  # after the workers, so that nothing else runs while it times one core
    for row in rows:
        row.pop("job", None)
    add_gzip_sizes(rows, settings["threads_all"])
    score_rows(rows, logits, labels, ckpt.spec.class_names, BASELINE, data_info["class_error"])
    result = {"command": command, "artifacts_dir": str(artifacts_dir), "checkpoint": str(checkpoint),
              "checkpoint_sha256": ckpt.sha256, "data": data_info, "settings": settings,
              "machine": machine, "rows": rows}
    write_reports(result, out_dir)
    return result
