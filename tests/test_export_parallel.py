"""`python -m export --jobs N`: formats exported in worker processes. Rows recorded at the same time are all
kept, a format that reuses another's files starts after it, and a worker that dies fails only its format."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import types
from pathlib import Path

import pytest

from export.__main__ import build_parser
from export.manifest import ArtifactEntry, read_manifest, record
from export.parallel import resolve_jobs, run_in_workers
from train.atomic import remove_partials


def _record_many(out_dir: str, prefix: str, n: int) -> None:
    for i in range(n):
        record(out_dir, ArtifactEntry(name=f"{prefix}{i}", format="onnx", precision="fp32", path=f"{prefix}{i}.onnx", runtime="onnxruntime",
                                      status="exported"))


def test_rows_recorded_by_processes_at_the_same_time_are_all_kept(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), p, 30)) for p in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(read_manifest(tmp_path)["artifacts"]) == 90  # an unlocked read-modify-write loses rows


def _task(name: str, *, log_dir: str) -> str:
    """Sleeps, logs when it ran; 'dies' kills its worker process the way a native crash would."""
    start = time.time()
    if name == "dies":
        Path(log_dir, ".model.x1.partial.onnx").write_bytes(b"half")  # as atomic_path names it
        os._exit(3)
    time.sleep(0.5 if name == "first" else 0.1)
    Path(log_dir, name).write_text(f"{start} {time.time()} {os.getpid()}")
    return f"{name} done"


def test_a_dead_worker_fails_only_its_own_format(tmp_path):
    """'dies' takes down whichever format runs beside it; that one runs again alone and succeeds, and only
    'dies' (which dies alone too) is reported, with the command that shows its error."""
    cleaned = []
    results = run_in_workers(_task, ["first", "dies", "second", "third"], 2, {"second": ("first",)},
                             lambda n, why: f"{n} crashed: {why}", log_dir=str(tmp_path),
                             on_broken=lambda: cleaned.extend(remove_partials(tmp_path)))
    assert results["dies"].startswith("dies crashed: its worker process died")
    assert cleaned and not list(tmp_path.glob(".*.partial*"))  # what the dead worker left is gone
    assert "--formats dies --jobs 1" in results["dies"]
    assert [results[n] for n in ("first", "second", "third")] == ["first done", "second done", "third done"]


def test_a_format_starts_after_the_one_whose_files_it_reuses(tmp_path):
    results = run_in_workers(_task, ["second", "first", "third"], 2, {"second": ("first",)},
                             lambda n, why: f"{n} crashed: {why}", log_dir=str(tmp_path))
    assert set(results.values()) == {"first done", "second done", "third done"}
    first_end = float((tmp_path / "first").read_text().split()[1])
    assert float((tmp_path / "second").read_text().split()[0]) >= first_end


def test_jobs_flag(monkeypatch):
    import psutil

    monkeypatch.setattr("export.parallel.usable_cores", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=64 * 2**30))
    assert resolve_jobs("auto", 8) == 4 and resolve_jobs("auto", 2) == 2 and resolve_jobs(3, 8) == 3
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=7 * 2**30))
    assert resolve_jobs("auto", 8) == 2  # 3 GB per worker
    monkeypatch.setitem(sys.modules, "fcntl", None)  # Windows: no POSIX locks for the shared manifest
    assert resolve_jobs("auto", 8) == 1 and resolve_jobs(3, 8) == 1
    assert build_parser().parse_args(["--checkpoint", "x", "--jobs", "2"]).jobs == 2
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["--checkpoint", "x", "--jobs", "0"])
    assert err.value.code == 2


def test_remove_partials_takes_only_what_atomic_path_left(tmp_path):
    (tmp_path / ".model.ab12.partial.onnx").write_bytes(b"x")
    (tmp_path / ".model_fp16.cd34.partial.mlpackage").mkdir()  # coremltools writes a folder
    (tmp_path / "model.onnx").write_bytes(b"kept")
    assert remove_partials(tmp_path) == [".model.ab12.partial.onnx", ".model_fp16.cd34.partial.mlpackage"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
