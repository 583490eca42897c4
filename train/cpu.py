"""What CPU this is, as far as int8 numerics are concerned.

int8 results depend on the CPU: x86 kernels without VNNI sum pairs of u8 x s8 products in int16 and
can saturate, so the same int8 file can flip images on an AVX2 server that it classifies correctly on
a VNNI one. Every verification records this description, and `auto` int8 targets are resolved from it.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import Any

from train import cgroup

INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile",
              "avx512_bf16", "asimd", "asimddp", "i8mm")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# Environment variables that restrict the kernels torch uses (to emulate an older CPU on a newer one).
ISA_RESTRICTIONS = ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
X86_ISAS = ("avx2", "vnni")


@functools.lru_cache(maxsize=4)
def cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    info = cpuinfo()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    """int8 dot products that accumulate in int32 (AVX-512 VNNI, AVX-VNNI, AMX): no int16 saturation."""
    return bool(VNNI_FLAGS & (cpu_flags() if flags is None else flags))


def x86_isa_of_cpu(flags: frozenset[str] | None = None) -> str | None:
    """'vnni' or 'avx2' for an x86-64 CPU (what its int8 kernels can do), None elsewhere."""
    if not is_x86():
        return None
    return "vnni" if has_vnni(flags) else "avx2"


def cpu_description() -> dict[str, Any]:
    """The CPU and its integer features, for every verification and benchmark record."""
    info = cpuinfo()
    flags = cpu_flags()
    out: dict[str, Any] = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "int8_flags": sorted(f for f in INT8_FLAGS if f in flags),
        "vnni": has_vnni(flags),
        "amx": "amx_int8" in flags,
        "x86_int8_isa": x86_isa_of_cpu(flags),
    }
    restricted = {k: os.environ[k] for k in ISA_RESTRICTIONS if os.environ.get(k)}
    if restricted:
        out["isa_restricted_by"] = restricted
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # torch absent or too old: the flags above still describe the CPU
        pass
    return out


# --------------------------------------------------------------------------- how many cores this process may use
def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (rounded down, at least 1,
    as Go's automaxprocs does: a thread more than the quota is throttled)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup.cpu_limit()
    return max(1, min(cores, int(limit))) if limit else cores


def quota_threads() -> int | None:
    """usable_cores() where a CPU quota applies, else None (each runtime keeps its own default thread count)."""
    return usable_cores() if cgroup.cpu_limit() else None


def fit_torch_threads() -> int | None:
    """Give torch no more threads than usable_cores() when a CPU quota is the smaller (torch counts the host's
    cores). Returns the new count, or None when nothing changed; OMP_NUM_THREADS, where set, is left to rule."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    cores = usable_cores()
    if torch.get_num_threads() <= cores:
        return None
    logging.getLogger(__name__).info("a CPU quota of %.2f CPUs: torch runs %d thread(s), not %d", cgroup.cpu_limit(),
                                     cores, torch.get_num_threads())
    torch.set_num_threads(cores)
    return cores
