"""The child process that measures one artifact: `python -m benchmarks.worker JOB.json RESULT.json`.

Run once per artifact by `benchmarks.run`, so each runtime starts cold in a fresh process: its thread
pools, allocator and peak memory never leak into another artifact's figures. The parent passes the
evaluation images as a float32 [0, 1] .npy file; this process writes the logits it computed to a .npy
file and every timing to RESULT.json. Warm-up runs are discarded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import time_batch1

def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process. On Linux VmHWM, because ru_maxrss survives exec and so would
    report the parent's peak (the parent held torch and every image when it forked this worker)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# Images held in memory for the first inference and the latency runs (cycled through); the accuracy pass reads the
# rest from the file a batch at a time
LATENCY_IMAGES = 16


class ImageFile:
    """Rows [start, stop) of the parent's float32 (N, 3, H, W) .npy file, read a slice at a time. Loaded whole,
    the 819 val images (493 MB at 224 px) counted in every artifact's peak memory, which is meant to be the
    runtime's own; read with plain file reads (not mapped), pages the OS caches do not count either."""

    def __init__(self, path: str | Path, start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, self.dtype = read_header(f)
            self._data_offset = f.tell()
        if fortran or len(shape) < 2:
            raise ValueError(f"{self.path}: expected a C-ordered (N, ...) array")
        stop = shape[0] if stop is None else min(stop, shape[0])
        self.start, self.shape = start, (max(0, stop - start), *shape[1:])
        self._row = int(np.prod(shape[1:]))

    def __getitem__(self, rows: slice) -> np.ndarray:
        begin, end, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("ImageFile takes contiguous slices only")
        count = max(0, end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._data_offset + (self.start + begin) * self._row * self.dtype.itemsize)
            data = np.fromfile(f, dtype=self.dtype, count=count * self._row)
        return data.reshape(count, *self.shape[1:]).astype(np.float32, copy=False)

    def shard(self, k: int, n: int) -> "ImageFile":
        """Shard k of n, split as np.array_split splits rows."""
        bounds = np.array_split(np.arange(self.shape[0]), n)[k]
        begin = int(bounds[0]) if len(bounds) else self.shape[0]
        return ImageFile(self.path, self.start + begin, self.start + begin + len(bounds))


def evaluate(runner: Any, images: ImageFile | np.ndarray, batch: int,
             min_images: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Logits for every image in batches of `batch`, and throughput from timed passes after a warm-up batch."""
    runner.run(images[:batch])
    logits, done, elapsed = None, 0, 0.0
    while logits is None or done < min_images:
        outs = []
        for i in range(0, images.shape[0], batch):
            chunk = images[i:i + batch]
            t0 = time.perf_counter()
            outs.append(runner.run(chunk))
            elapsed += time.perf_counter() - t0
            done += chunk.shape[0]
        if logits is None:
            logits = np.concatenate(outs).astype(np.float32)
    return logits, {"throughput_ips": done / elapsed, "throughput_images": done,
                    "throughput_batch": int(min(batch, images.shape[0]))}


def _load(job: dict[str, Any], threads: int) -> tuple[Any, dict[str, Any]]:
    from export.runners import get_runner

    runtime = job["runtime"]
    runner = get_runner(runtime, threads=threads, engine=job.get("engine"))
    t0 = time.perf_counter()
    for name in runner.modules:  # timed apart from the load: an app embeds the runtime, it never imports it
        with contextlib.suppress(ImportError):  # load() then says what is missing
            importlib.import_module(name)
    res: dict[str, Any] = {"import_s": time.perf_counter() - t0, "rss_before_load_mb": rss_mb()}
    t0 = time.perf_counter()
    runner = runner.load(job["path"])
    res["load_s"] = time.perf_counter() - t0
    return runner, res


# All cores no faster than this fraction of 1-thread latency: the accuracy pass runs as one 1-thread process
# per core on a shard of the images instead (qnnpack's x86 kernels gain nothing from a second thread)
SERIAL_LATENCY_RATIO = 0.8


def gains_from_threads(res: dict[str, Any], threads: int) -> bool:
    """Whether the runtime ran batch 1 clearly faster on all cores than on one. Fastest runs against fastest
    runs: a burst of load from another tenant moves the medians, not the minimums."""
    one = (res.get("latency_1t") or {}).get("min_ms")
    return threads <= 1 or not one or res["latency_all"]["min_ms"] < SERIAL_LATENCY_RATIO * one


def evaluate_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Phase 'eval': logits and throughput for shard k of n (job['shard'] = [k, n]) on 1 thread."""
    k, n = job["shard"]
    images = ImageFile(job["images"]).shard(k, n)
    runner, res = _load(job, 1)
    logits, thr = evaluate(runner, images, int(job["batch"]), max(1, int(job.get("min_throughput_images", 64)) // n))
    np.save(job["logits_out"], logits)
    return {**res, **thr, "peak_rss_mb": peak_rss_mb()}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Every figure for one artifact, in the order a user meets them: load, first answer, steady state.
    job['phase'] is 'all' (default) or 'eval' (one shard of the accuracy pass). Where all cores gain nothing,
    the result says eval='sharded' and the parent runs the accuracy pass as one 'eval' process per core."""
    if job.get("phase") == "eval":
        return evaluate_shard(job)
    images = ImageFile(job["images"])
    sample = images[:LATENCY_IMAGES]
    path, n_all = job["path"], int(job["threads_all"])
    runner, res = _load(job, 1)
    t0 = time.perf_counter()
    first = runner.run(sample[:1])
    res["first_inference_ms"] = (time.perf_counter() - t0) * 1000
    res["output_classes"] = int(first.shape[-1])
    if job.get("num_classes") and first.shape[-1] != job["num_classes"]:
        raise ValueError(f"the artifact outputs {first.shape[-1]} classes but the model/data have "
                         f"{job['num_classes']}")
    res["latency_1t"] = time_batch1(runner, sample, job["runs"], job["warmup"])
    res["threads_1t"] = 1
    res["peak_rss_b1_mb"] = peak_rss_mb()
    res["engine"] = runner.describe().get("engine")
    t0 = time.perf_counter()
    runner = runner.with_threads(n_all, path)
    res["load_all_threads_s"] = time.perf_counter() - t0
    res["threads_all"] = runner.threads
    res["latency_all"] = time_batch1(runner, sample, job["runs"], job["warmup"])
    if not gains_from_threads(res, runner.threads):
        return {**res, "eval": "sharded", "peak_rss_mb": peak_rss_mb()}
    logits, thr = evaluate(runner, images, int(job["batch"]), int(job.get("min_throughput_images", 64)))
    res.update(thr)
    np.save(job["logits_out"], logits)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    try:
        result = {"ok": True, **measure(job)}
    except Exception as err:  # every failure becomes a failed row in the parent, with this reason
        result = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:400]}"
                  if str(err).strip() else type(err).__name__,
                  "traceback": traceback.format_exc()[-3000:]}
    result["pid"] = os.getpid()
    Path(argv[1]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
