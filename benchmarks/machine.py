"""What machine a benchmark ran on: CPU, vector extensions, library versions, and an arithmetic peak.

Latency figures mean little without this, so it is recorded next to every result.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from export.registry import tools
from train import cgroup
from train.cpu import cpu_description, usable_cores

INTERESTING_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")
RESNET18_GMACS_224 = 1.82  # multiply-adds per 224x224 image (torchvision's figure)


def _cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    from train.cpu import cpuinfo

    return cpuinfo(path)


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in tools():
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# AMD's Zen 4 (CPU family 25 with AVX-512) executes each 512-bit FMA as two 256-bit halves on its two FMA pipes
AMD_HALF_RATE_AVX512_FAMILY = "25"


def flops_per_cycle(flags: set[str], vendor: str = "", family: str = "") -> tuple[int, str]:
    """fp32 FLOPs per cycle per core from the widest FMA the CPU has; the assumption is returned too."""
    if "avx512f" in flags and vendor == "AuthenticAMD" and family == AMD_HALF_RATE_AVX512_FAMILY:
        return 32, "AMD Zen 4: AVX-512 FMAs run as two 256-bit halves, 8 fp32 lanes x 2 (FMA) x 2 FMA pipes per core"
    if "avx512f" in flags:
        return 64, "AVX-512: 16 fp32 lanes x 2 (FMA) x 2 FMA units per core (server Xeon assumption)"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: 8 fp32 lanes x 2 (FMA) x 2 FMA units per core"
    if "avx" in flags:
        return 16, "AVX: 8 fp32 lanes x (1 add + 1 mul) per cycle"
    if "asimd" in flags or "neon" in flags or platform.machine() in ("arm64", "aarch64"):
        return 16, "NEON: 4 fp32 lanes x 2 (FMA) x 2 pipes per core (assumption)"
    return 8, "scalar/SSE assumption: 8 fp32 FLOPs per cycle"


def machine_info() -> dict[str, Any]:
    """CPU model, logical/physical cores, vector flags, clock, fp32 peak estimate and library versions."""
    import psutil

    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    freq = psutil.cpu_freq()
    mhz = float(info.get("cpu MHz", 0) or 0) or (freq.max or freq.current if freq else 0.0)
    fpc, assumption = flops_per_cycle(flags, info.get("vendor_id", ""), info.get("cpu family", ""))
    peak_core = mhz / 1000 * fpc if mhz else None
    usable = usable_cores()  # the benchmark's all-core runs use these (affinity, a container's CPU quota)
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "logical_cores": logical,
        "physical_cores": physical,
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical,
        "cpu_quota": cgroup.cpu_limit(),  # CPUs a container's quota allows (None: no quota)
        "usable_cores": usable,
        "cpu_mhz": round(mhz, 1) if mhz else None,
        "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
        "has_avx512": "avx512f" in flags,
        "has_vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "has_amx": "amx_tile" in flags,
        "fp32_flops_per_cycle": fpc,
        "peak_assumption": assumption,
        "peak_gflops_per_core": round(peak_core, 1) if peak_core else None,
        "peak_gflops_all_cores": round(peak_core * min(physical, usable), 1) if peak_core else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "libraries": library_versions(),
        "int8": cpu_description(),
    }


def resnet18_gflop(input_size: int) -> float:
    """FLOPs (2 per multiply-add) of one ResNet-18 forward pass at input_size x input_size, in G."""
    return 2 * RESNET18_GMACS_224 * (input_size / 224) ** 2


def describe(m: dict[str, Any]) -> str:
    """One line for reports."""
    flags = ", ".join(m["flags"]) or "none detected"
    quota = f" (a CPU quota of {m['cpu_quota']:g} lets this process use {m['usable_cores']})" if m.get("cpu_quota") else ""
    return (f"{m['cpu_model']} ({m['machine']}), {m['logical_cores']} logical / {m['physical_cores']} "
            f"physical cores{quota} at {m['cpu_mhz']} MHz; vector flags: {flags}; {m['system']}")
