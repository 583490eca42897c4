"""What a container's cgroup (v1 or v2) lets this process use: CPUs by a quota (docker --cpus, a Kubernetes CPU
limit) and memory by a limit (docker --memory). Neither torch, ONNX Runtime, os.sched_getaffinity nor psutil
sees them: in a 2-CPU, 4 GB container on a 64-core, 256 GB host they all count the host."""

from __future__ import annotations

import functools
from pathlib import Path

PROC_CGROUP = "/proc/self/cgroup"
ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 60  # cgroup v1 writes "no memory limit" as a number near 2**63


def _folders(v1_controller: str, proc_cgroup: str | Path | None, root: str | Path | None) -> list[Path]:
    """The folders of this process's cgroup and of every cgroup above it (a limit on any of them applies): in
    the v2 hierarchy, and in the v1 hierarchy that holds `v1_controller`. None: this process's own files
    (PROC_CGROUP, ROOT, read when called)."""
    try:
        lines = Path(PROC_CGROUP if proc_cgroup is None else proc_cgroup).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    root = Path(ROOT if root is None else root)
    folders = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        here = Path(path.strip().lstrip("/"))
        chain = [here, *here.parents]  # Path("a/b").parents ends at ".", the hierarchy's root
        if controllers == "":
            mount: Path | None = root
        elif v1_controller in controllers.split(","):
            mount = next((root / m for m in (controllers, v1_controller, "cpu,cpuacct", "cpuacct,cpu")
                          if (root / m).is_dir()), None)
        else:
            continue
        if mount is not None:
            folders += [mount / p for p in chain]
    return folders


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def cpu_limit(proc_cgroup: str | Path | None = None, root: str | Path | None = None) -> float | None:
    """CPUs this process may keep busy by its CPU quota, the smallest over its cgroups; None without one.
    A thread more than the quota is stalled every scheduling period. Read once per process (every runner and
    thread count asks), unlike memory_available, whose usage part moves."""
    limits = []
    for folder in _folders("cpu", proc_cgroup, root):
        v2, quota, period = _read(folder / "cpu.max"), _read(folder / "cpu.cfs_quota_us"), None
        if v2:
            quota, _, period = v2.partition(" ")
        elif quota:
            period = _read(folder / "cpu.cfs_period_us")
        try:
            if quota not in (None, "max", "-1") and period:
                limits.append(int(quota) / int(period))
        except (ValueError, ZeroDivisionError):
            pass
    return min(limits) if limits else None


def memory_available(proc_cgroup: str | Path | None = None, root: str | Path | None = None) -> int | None:
    """Bytes this process's cgroups still allow (limit minus usage, the smallest over its cgroups); None
    without a memory limit. Past it the kernel kills a process, which psutil's 'available' does not foresee."""
    left = []
    for folder in _folders("memory", proc_cgroup, root):
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, usage = _read(folder / limit_file), _read(folder / usage_file)
            try:
                if limit not in (None, "max") and int(limit) < NO_LIMIT:
                    left.append(max(0, int(limit) - int(usage or 0)))
            except ValueError:
                pass
    return min(left) if left else None
