"""`python -m export --jobs N`: formats exported in worker processes. Rows recorded at the same time are all
kept, a format that reuses another's files starts after it, and a worker that dies fails only its format."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest

from export.__main__ import build_parser
from export.manifest import ArtifactEntry, read_manifest, record
from export.parallel import PARENT_GONE_GRACE_S, resolve_jobs, run_in_workers
from train.atomic import atomic_path, remove_partials

REPO = Path(__file__).resolve().parents[1]


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


def _write_slowly(name: str, *, out_dir: str) -> None:
    """A format caught mid-write: its half-written file exists under atomic_path's temporary name."""
    with atomic_path(Path(out_dir) / f"model_{name}.onnx") as tmp:
        tmp.write_bytes(b"half")
        time.sleep(300)


# An export in its own process (what `python -m export --jobs 2` runs), so the test can end it.
_EXPORT = """
import sys
sys.path.insert(0, {tests!r})
import test_export_parallel as t
from export.parallel import run_in_workers
from train.errors import cli_errors

@cli_errors
def main():
    run_in_workers(t._write_slowly, ["a", "b"], 2, {{}}, lambda n, why: why, out_dir={out!r})
    return 0

sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_an_ended_export_leaves_no_worker_and_no_half_written_file(tmp_path, how):
    """`kill PID` (SIGTERM) reaches only the parent: it must interrupt its workers, which remove their
    half-written files, and say so (exit 130). After kill -9 the workers notice their parent is gone and do
    the same. Before, the workers finished their formats into the folder and then waited for work forever."""
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT.format(tests=str(REPO / "tests"), out=str(tmp_path))],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(".*.partial*"))) < 2:  # both workers are mid-write
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, getattr(signal, how))
        code = proc.wait(timeout=60)
        if how == "SIGTERM":
            assert code == 130 and "interrupted" in proc.stderr.read()
        _, alive = psutil.wait_procs(family, timeout=PARENT_GONE_GRACE_S + 20)
        assert alive == [], [p.cmdline()[-3:] for p in alive]
        assert list(tmp_path.glob(".*.partial*")) == []
    finally:  # a failing run must not leave processes behind either
        if proc.poll() is None:
            proc.kill()
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_a_command_turns_sigterm_into_an_interrupt_and_leaves_an_ignored_signal_alone(capsys):
    """Every command (cli_errors) treats SIGTERM like Ctrl-C: its `finally` blocks run and it exits 130. A
    signal the caller ignores (SIGHUP under nohup) stays ignored, and the old handlers return afterwards."""
    from train.errors import EXIT_INTERRUPTED, cli_errors

    seen = {}

    @cli_errors
    def main() -> int:
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises KeyboardInterrupt long before this ends
        finally:
            seen["finally ran"] = True
        return 0

    old_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a plain process's disposition
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        started = time.monotonic()
        assert main() == EXIT_INTERRUPTED and time.monotonic() - started < 10
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    assert seen == {"hup": signal.SIG_IGN, "finally ran": True}
    assert capsys.readouterr().err.strip() == "interrupted"


def _cgroup(tmp_path, proc_lines, files):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    for rel, text in files.items():
        (tmp_path / "cg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / rel).write_text(text)
    return proc, tmp_path / "cg"


@pytest.mark.parametrize("proc_lines, files, expected", [
    # cgroup v2 in a container (its own cgroup seen as /): docker --cpus 2
    (["0::/"], {"cpu.max": "200000 100000\n"}, 2.0),
    # cgroup v2 on a host: a pod's quota on a parent of the process's cgroup counts too
    (["0::/kubepods/pod1/ctr"], {"kubepods/pod1/cpu.max": "150000 100000\n",
                                 "kubepods/pod1/ctr/cpu.max": "max 100000\n"}, 1.5),
    (["0::/"], {"cpu.max": "max 100000\n"}, None),  # no quota
    # cgroup v1, cpu and cpuacct mounted together, as docker does
    (["4:cpu,cpuacct:/docker/abc", "3:memory:/docker/abc"],
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     0.5),
    (["1:cpu:/"], {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ([], {}, None),  # not Linux, or no cgroup file
])
def test_a_cpu_quota_is_read_from_cgroup_v1_and_v2(tmp_path, proc_lines, files, expected):
    from train import cgroup

    proc, root = _cgroup(tmp_path, proc_lines, files)
    assert cgroup.cpu_limit(proc, root) == expected


def test_a_cpu_quota_caps_cores_workers_and_torch_threads(monkeypatch):
    """In a 2-CPU container on a 64-core host torch, ONNX Runtime and os.sched_getaffinity all count 64: the
    export would start 8 workers of 8 threads each (measured on a 2-core EPYC under a 1-CPU quota: ResNet-18
    batch 8 ran in 429 ms with 2 torch threads and 361 ms with 1)."""
    import psutil
    import torch

    from train import cpu, recipe

    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cpu.cgroup, "cpu_limit", lambda *a, **k: 2.5)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu.usable_cores() == 2 and recipe.default_workers() == 2
    monkeypatch.setattr("export.parallel.usable_cores", cpu.usable_cores)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=64 * 2**30))
    assert resolve_jobs("auto", 8) == 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert cpu.fit_torch_threads() == 2 and torch.get_num_threads() == 2
        assert cpu.fit_torch_threads() is None  # already within the quota
        torch.set_num_threads(8)
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's own setting rules
        assert cpu.fit_torch_threads() is None and torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(cpu.cgroup, "cpu_limit", lambda *a, **k: 0.5)
    assert cpu.usable_cores() == 1
    monkeypatch.setattr(cpu.cgroup, "cpu_limit", lambda *a, **k: None)
    assert cpu.usable_cores() == 64


@pytest.mark.parametrize("proc_lines, files, expected_gb", [
    (["0::/"], {"memory.max": str(4 << 30), "memory.current": str(1 << 30)}, 3),  # docker --memory 4g, v2
    (["0::/"], {"memory.max": "max", "memory.current": str(1 << 30)}, None),
    (["9:memory:/docker/abc"], {"memory/docker/abc/memory.limit_in_bytes": str(7 << 30),
                                "memory/docker/abc/memory.usage_in_bytes": str(1 << 30)}, 6),
    (["9:memory:/"], {"memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
                      "memory/memory.usage_in_bytes": str(1 << 30)}, None),
])
def test_a_memory_limit_caps_the_export_workers(tmp_path, monkeypatch, proc_lines, files, expected_gb):
    """psutil reports the host's available memory: under a 3 GB container limit on the 22 GB machine `--jobs
    auto` started 2 workers, the kernel killed one, and its formats ran again alone (4 min 59 s in all)."""
    import psutil

    from train import cgroup

    proc, root = _cgroup(tmp_path, proc_lines, files)
    left = cgroup.memory_available(proc, root)
    assert left == (expected_gb << 30 if expected_gb is not None else None)
    monkeypatch.setattr("export.parallel.usable_cores", lambda: 16)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=200 * 2**30))
    monkeypatch.setattr(cgroup, "memory_available", lambda: left)
    assert resolve_jobs("auto", 8) == (max(1, expected_gb // 3) if expected_gb is not None else 8)


def test_where_memory_is_tight_each_format_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """Under a 3 GB container limit one process exporting every format was killed at 3.06 GB; a fresh process
    per format gives memory back after each (measured: all 19 files in 3 min 26 s, peak 2.2 GB)."""
    from train import cgroup
    from export import parallel

    results = run_in_workers(_task, ["first", "second", "dies", "third"], 1, {}, lambda n, why: f"{n} crashed",
                             one_per_process=True, log_dir=str(tmp_path))
    pids = {n: (tmp_path / n).read_text().split()[2] for n in ("first", "second", "third")}
    assert len(set(pids.values())) == 3 and str(os.getpid()) not in pids.values()
    assert results["dies"] == "dies crashed" and results["third"] == "third done"  # a death costs one format
    monkeypatch.setattr(cgroup, "memory_available", lambda: 5 * 2**30)
    assert parallel.memory_tight()
    monkeypatch.setattr(cgroup, "memory_available", lambda: 7 * 2**30)
    assert not parallel.memory_tight()
    monkeypatch.setattr(cgroup, "memory_available", lambda: None)  # no container limit: psutil's figure rules
    assert not parallel.memory_tight()
