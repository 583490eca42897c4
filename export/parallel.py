"""Formats exported side by side in worker processes (`python -m export --jobs N`).

Much of an export is single-threaded Python (graph lowering, converters, coremltools passes), so one process
leaves cores idle even when torch uses them all. N spawned workers each take one format at a time with
cores/N threads; a format that reuses another's files (the registry's `after`) starts once that one is done.
Workers write their own files and rows; the manifest's read-modify-write is locked (export.manifest).
An interrupted export (Ctrl-C, SIGTERM) stops its workers, and a worker whose parent is gone (kill -9, a
crash) interrupts itself: no worker goes on writing into the folder, or waits for work, after its export.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from train import cgroup
from train.cpu import usable_cores

log = logging.getLogger(__name__)


WORKER_MEMORY_GB = 3  # a worker's peak resident memory exporting the heaviest format at 224 px, rounded up


def resolve_jobs(jobs: int | str, n_formats: int) -> int:
    """'auto' = one worker per core, at most one per format and one per WORKER_MEMORY_GB of available memory (the
    host's, or what a container's memory limit leaves, if less); an integer is taken as it is (1 = one format
    after another in this process). Without POSIX file locks (Windows) the manifest cannot be shared safely, so
    it is always 1 there."""
    try:
        import fcntl  # noqa: F401  (what export.manifest locks with)
    except ImportError:
        if jobs != 1:
            log.warning("--jobs %s: this platform has no POSIX file locks; exporting one format at a time", jobs)
        return 1
    if jobs != "auto":
        return max(1, int(jobs))
    import psutil

    available = psutil.virtual_memory().available
    limited = cgroup.memory_available()  # a container's memory limit, which psutil does not see
    if limited is not None:
        available = min(available, limited)
    by_memory = int(available / 2**30 // WORKER_MEMORY_GB)
    return max(1, min(usable_cores(), n_formats, by_memory))


def memory_tight() -> bool:
    """A container's memory limit leaves room for fewer than two workers. One process exporting every format
    then grows past it and is killed (measured under a 3 GB limit: `--jobs 1` killed at 3.06 GB after 2 min 44 s,
    nothing left to retry), while a fresh process per format gives its memory back after each one."""
    left = cgroup.memory_available()
    return left is not None and left < 2 * WORKER_MEMORY_GB * 2**30


def _log_levels() -> dict[str, int]:
    """The parent's logging levels (root and every logger it set), for its workers to copy."""
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger) and lg.level}
    return {"": logging.getLogger().level, **levels}


PARENT_GONE_GRACE_S = 10.0  # how long a worker whose parent died has to remove its half-written files


def _exit_with_parent(parent: int) -> None:
    """Interrupt this worker once its parent is gone (it would finish its format into a folder no export
    reads, then wait for work forever), and end it if the interrupt has not within the grace period."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # -> KeyboardInterrupt: the format's `finally` blocks clean up
        time.sleep(PARENT_GONE_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(threads: int, levels: dict[str, int], parent: int) -> None:
    """Each worker gets its share of the cores (torch's pool and the runtimes' default thread count), keeps
    freed memory for its next batch (train.memory) and logs like its parent, each line naming the worker.
    SIGTERM interrupts it like Ctrl-C, and it ends itself when its parent dies."""
    import torch

    from export import runners
    from train.errors import interrupt_on_termination_signals
    from train.memory import keep_freed_memory

    interrupt_on_termination_signals()
    _exit_with_parent(parent)
    keep_freed_memory()
    torch.set_num_threads(threads)
    runners.DEFAULT_THREADS = threads
    logging.basicConfig(level=levels.get("", logging.WARNING),
                        format="[%(processName)s] %(levelname)s %(name)s: %(message)s")
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _ready(pending: list[str], after: dict[str, Sequence[str]], done: set[str], names: Sequence[str]) -> list[str]:
    return [n for n in pending if all(d in done or d not in names for d in after.get(n, ()))]


CRASH = ("its worker process died (out of memory or a crash in a native library) when it ran alone; run "
         "`python -m export --formats {name} --jobs 1` to see the error")


def run_in_workers(task: Callable[..., Any], names: Sequence[str], jobs: int, after: dict[str, Sequence[str]],
                   on_crash: Callable[[str, str], Any], on_broken: Callable[[], Any] = lambda: None,
                   one_per_process: bool = False, **kwargs: Any) -> dict[str, Any]:
    """task(name, **kwargs) for every name in `jobs` spawned processes; returns {name: result}. A worker that
    dies breaks the pool and takes the formats running beside it along: those go on later, each alone in
    its own pool, so the one that crashes is the only one given on_crash(name, reason) as its result.
    on_broken() runs after each broken pool, when none of its workers is left (to clean what they left).
    `one_per_process`: each name alone in a fresh process, one after another (memory_tight)."""
    threads = max(1, usable_cores() // jobs)
    results: dict[str, Any] = {}
    interrupted = []
    for batch in ([[n] for n in names] if one_per_process else [list(names)]):
        interrupted += _run_pool(task, batch, jobs, threads, after, names, results, on_crash, kwargs)
    if interrupted:
        on_broken()
        log.warning("an export worker died while %s ran; running each of them again on its own", interrupted)
    for name in interrupted:
        if _run_pool(task, [name], 1, threads, after, names, results, on_crash, kwargs):
            on_broken()
            results[name] = on_crash(name, CRASH.format(name=name))
    return results


def _run_pool(task: Callable[..., Any], pending: list[str], jobs: int, threads: int, after: dict[str, Sequence[str]],
              names: Sequence[str], results: dict[str, Any], on_crash: Callable[[str, str], Any],
              kwargs: dict[str, Any]) -> list[str]:
    """Run `pending` in pools of `jobs` workers, filling `results`; returns the formats a dying worker
    interrupted (a fresh pool takes the rest)."""
    interrupted: list[str] = []
    while pending:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, _log_levels(), os.getpid()))
        running: dict[Future, str] = {}
        try:
            while pending or running:
                ready = _ready(pending, after, set(results), names) or ([] if running else list(pending))
                for name in ready[:jobs - len(running)]:  # queued work would die with a broken pool
                    future = pool.submit(task, name, **kwargs)  # a broken pool raises here; `name` stays pending
                    pending.remove(name)
                    running[future] = name
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    try:
                        results[name] = future.result()
                    except BrokenProcessPool:
                        interrupted.append(name)
                    except Exception as err:  # the task itself catches export errors; this is a transport failure
                        results[name] = on_crash(name, f"{type(err).__name__}: {err}")
        except BrokenProcessPool:  # submit() on a pool that broke since the last wait
            interrupted += list(running.values())
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: interrupt the workers too, rather than wait for them
            _interrupt_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return interrupted


def _interrupt_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM each worker (a KeyboardInterrupt there: its format cleans up and stops); the pool has no public
    way to reach them, and Ctrl-C in a terminal reaches them anyway while `kill PID` reaches only the parent."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        if process.is_alive():
            process.terminate()
