"""The decisions drawn from benchmark rows: which artifact to ship, whether the speed targets hold (overall
and per runtime), and how close the fastest float artifact gets to the CPU's arithmetic peak."""

from __future__ import annotations

from typing import Any

from benchmarks.machine import resnet18_gflop
from export.registry import format_of, variants
from quantize.targets import MIN_TOP1_AGREEMENT

MOBILE_RUNTIMES = tuple(dict.fromkeys(v.runtime for v in variants().values() if format_of(v.name).mobile))
FLOAT_PRECISIONS = ("fp32", "fp16")
INT8_TARGET = 0.35


def p50(row: dict[str, Any], key: str = "latency_1t") -> float | None:
    lat = row.get(key)
    return lat.get("p50_ms") if isinstance(lat, dict) else None


def is_int8(row: dict[str, Any]) -> bool:
    return row.get("precision") == "int8"


def is_float(row: dict[str, Any]) -> bool:
    return row.get("precision") in FLOAT_PRECISIONS


def why_not_usable(row: dict[str, Any], max_drop: float) -> str | None:
    """The first reason a measured row cannot be recommended, for the report (None for a usable row, and
    for a row that was not measured or failed: those are reported as such)."""
    if not row.get("measured") or row.get("status") == "failed":
        return None
    if row.get("manifest_status") != "verified":
        return f"not verified on real images at export ({row.get('manifest_status')})"
    if row.get("accuracy_change") is None:
        return "no accuracy measured"
    if row["accuracy_change"] < -max_drop:
        return f"accuracy drop {-row['accuracy_change']:.2f} points > {max_drop}"
    if (row.get("top1_agreement") or 0.0) < MIN_TOP1_AGREEMENT:
        return f"top-1 agreement {100 * (row.get('top1_agreement') or 0):.2f}% < {100 * MIN_TOP1_AGREEMENT:.1f}%"
    return None


def usable(row: dict[str, Any], max_drop: float) -> bool:
    """Verified on real images at export, measured here, within the allowed accuracy drop (percentage points)
    and at or above the agreement target with the float model on this benchmark's images."""
    return bool(row.get("measured") and row.get("status") != "failed" and why_not_usable(row, max_drop) is None)


def _agreement(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in ("top1_agreement", "top1_agreement_ci95", "n_images")}


def recommend(rows: list[dict[str, Any]], max_drop: float, baseline: str) -> dict[str, Any]:
    """Phone: the smallest mobile-runtime artifact within the drop (ties within 5% of that size go to the
    fastest at 1 thread). Server: the highest batch throughput within the drop."""
    ok = [r for r in rows if r["name"] != baseline and usable(r, max_drop)]
    # '@x86' rows re-run a phone int8 file with a server engine: not what a phone would see
    mobile = [r for r in ok if r.get("runtime") in MOBILE_RUNTIMES and r.get("size_bytes") and "@" not in r["name"]]
    out: dict[str, Any] = {"max_drop_points": max_drop, "min_top1_agreement": MIN_TOP1_AGREEMENT, "phone": None,
                           "server": None,
                           "excluded": {r["name"]: why for r in rows if r["name"] != baseline
                                        and (why := why_not_usable(r, max_drop))}}
    if mobile:
        smallest = min(r["size_bytes"] for r in mobile)
        near = [r for r in mobile if r["size_bytes"] <= smallest * 1.05]
        pick = min(near, key=lambda r: p50(r) or float("inf"))
        out["phone"] = {"name": pick["name"], "size_mb": pick["size_bytes"] / 1e6, "p50_ms_1t": p50(pick),
                        "accuracy_change": pick["accuracy_change"], **_agreement(pick)}
    if ok:
        pick = max(ok, key=lambda r: r.get("throughput_ips") or 0)
        out["server"] = {"name": pick["name"], "throughput_ips": pick.get("throughput_ips"),
                         "accuracy_change": pick["accuracy_change"], **_agreement(pick)}
    return out


def targets(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """The issue's two speed targets at batch 1, 1 thread, p50, as PASS / FAIL / N/A lines."""
    measured = [r for r in rows if r.get("measured") and r.get("status") != "failed" and p50(r)]
    base = next((r for r in measured if r["name"] == baseline), None)
    out = []
    int8 = [r for r in measured if is_int8(r)]
    if base and int8:
        best = min(int8, key=p50)
        ratio = p50(best) / p50(base)
        out.append({"target": f"fastest int8 <= {INT8_TARGET} x float PyTorch latency (batch 1, 1 thread)",
                    "result": "PASS" if ratio <= INT8_TARGET else "FAIL", "artifact": best["name"],
                    "detail": f"{best['name']} {p50(best):.2f} ms vs {p50(base):.2f} ms = {ratio:.2f} x"})
    else:
        out.append({"target": "fastest int8 vs float PyTorch", "result": "N/A",
                    "detail": "no measured int8 artifact or baseline"})
    ort = [r for r in measured if r.get("runtime") == "onnxruntime" and is_float(r)]
    others = [r for r in measured if is_float(r) and r.get("runtime") != "onnxruntime" and r["name"] != baseline]
    if ort and others:
        ref, best = min(ort, key=p50), min(others, key=p50)
        ratio = p50(best) / p50(ref)
        out.append({"target": "fastest float artifact outside ONNX Runtime <= ONNX Runtime float latency "
                              "(batch 1, 1 thread)", "result": "PASS" if ratio <= 1.0 else "FAIL",
                    "artifact": best["name"],
                    "detail": f"{best['name']} {p50(best):.2f} ms vs {ref['name']} {p50(ref):.2f} ms = {ratio:.2f} x"})
    else:
        out.append({"target": "fastest float artifact vs ONNX Runtime float", "result": "N/A",
                    "detail": "needs a measured ONNX Runtime float artifact and another float artifact"})
    return out


# Per-runtime targets at batch 1, 1 thread, p50, ratios within one run (issues 16 and 17): a float file's
# latency over ONNX Runtime's float model.onnx, and each int8 file's speedup over its own float file
FLOAT_VS_ORT = {"pytorch-lite": 1.1, "executorch": 1.2, "litert": 1.0}
ORT_FLOAT = "onnx_fp32"
INT8_SPEEDUP = {"vnni": 3.6, "avx2": 2.0}


def float_counterpart(name: str) -> str:
    """The float file an int8 row is compared with: ptl_int8@x86 -> ptl_fp32, onnx_int8_static -> onnx_fp32,
    ort_mobile_int8 -> ort_mobile_fp32."""
    return name.split("@")[0].split("_int8")[0] + "_fp32"


X86_MACHINES = ("x86_64", "AMD64")


# Runtimes whose int8 kernels are PyTorch's (fbgemm), which FBGEMM_ENABLE_INSTRUCTIONS=AVX2 limits to AVX2
TORCH_RUNTIMES = ("pytorch-lite", "torchscript", "torch-eager")


def int8_speedup_target(machine: dict[str, Any], runtime: str | None = None) -> tuple[float | None, str]:
    """The int8-over-float speedup an x86 CPU should reach: 3.6x with VNNI, 2x with AVX2 only (none elsewhere).
    PyTorch's int8 kernels limited to AVX2 (the AVX2 emulation the README describes) get the AVX2 target."""
    if machine.get("machine") not in X86_MACHINES:
        return None, "no target off x86"
    limit = ((machine.get("int8") or {}).get("isa_restricted_by") or {}).get("FBGEMM_ENABLE_INSTRUCTIONS", "")
    if runtime in TORCH_RUNTIMES and limit.upper() == "AVX2":
        return INT8_SPEEDUP["avx2"], "AVX2: FBGEMM_ENABLE_INSTRUCTIONS=AVX2"
    return (INT8_SPEEDUP["vnni"], "VNNI") if machine.get("has_vnni") else (INT8_SPEEDUP["avx2"], "AVX2, no VNNI")


def _verdict(ok: bool | None) -> str:
    return "N/A" if ok is None else "PASS" if ok else "FAIL"


def ceiling_share(row: dict[str, Any], machine: dict[str, Any], input_size: int) -> float | None:
    """The row's operations per second at batch 1, 1 thread, as a share of this CPU's GEMM ceiling for its
    precision (benchmarks.roofline; fp16 files run in fp32 off Apple hardware). None where nothing was measured."""
    ceiling = machine.get("gemm_ceiling") or {}
    peak = ceiling.get("int8_gops") if is_int8(row) else ceiling.get("fp32_gflops")
    if not peak or not p50(row):
        return None
    return resnet18_gflop(input_size) / (p50(row) / 1000) / peak


def runtime_ratios(rows: list[dict[str, Any]], machine: dict[str, Any], input_size: int = 224) -> list[dict[str, Any]]:
    """Every measured float file against ONNX Runtime's float file, and every int8 file against its own
    float file, each with the issues' target (N/A where none applies: qnnpack's x86 kernels are not what
    a phone runs; the '@x86' row times the same file with the x86 engine) and each file's share of the CPU's
    GEMM ceiling (for an int8 row: its own, then its float file's)."""
    by_name = {r["name"]: r for r in rows if r.get("measured") and r.get("status") != "failed" and p50(r)}
    ort = by_name.get(ORT_FLOAT)
    out = []
    for name, row in by_name.items():
        share = ceiling_share(row, machine, input_size)
        if is_float(row) and ort and name != ORT_FLOAT and row.get("runtime") in FLOAT_VS_ORT:
            ratio, limit = p50(row) / p50(ort), FLOAT_VS_ORT[row["runtime"]]
            out.append({"artifact": name, "against": ORT_FLOAT, "measure": "latency ratio", "value": ratio,
                        "target": f"<= {limit:.1f}x", "result": _verdict(ratio <= limit),
                        "ceiling_share": [share, ceiling_share(ort, machine, input_size)]})
        base = by_name.get(float_counterpart(name))
        if is_int8(row) and base:
            speedup, (need, isa) = p50(base) / p50(row), int8_speedup_target(machine, row.get("runtime"))
            if row.get("engine") == "qnnpack" and machine.get("machine") in X86_MACHINES:
                target, ok = "none: qnnpack's x86 kernels (phones run its Arm ones)", None
            else:
                target, ok = (f">= {need:.1f}x ({isa})", speedup >= need) if need else (isa, None)
            out.append({"artifact": name, "against": base["name"], "measure": "int8 speedup", "value": speedup,
                        "target": target, "result": _verdict(ok),
                        "ceiling_share": [share, ceiling_share(base, machine, input_size)]})
    return out


def compute_efficiency(rows: list[dict[str, Any]], machine: dict[str, Any], input_size: int) -> dict[str, Any] | None:
    """Achieved GFLOP/s of the fastest float row, against the nominal peak in machine_info and against the
    fp32 GEMM ceiling measured on this core (benchmarks.roofline)."""
    floats = [r for r in rows if r.get("measured") and r.get("status") != "failed" and is_float(r) and p50(r)]
    if not floats:
        return None
    gflop = resnet18_gflop(input_size)
    best = min(floats, key=p50)
    best_thr = max(floats, key=lambda r: r.get("throughput_ips") or 0)
    one = gflop / (p50(best) / 1000)
    many = gflop * (best_thr.get("throughput_ips") or 0)
    peak1, peak_all = machine.get("peak_gflops_per_core"), machine.get("peak_gflops_all_cores")
    return {"gflop_per_image": gflop, "fastest_1t": best["name"], "gflops_1t": one,
            "fraction_of_core_peak": one / peak1 if peak1 else None,
            "fraction_of_gemm_ceiling": ceiling_share(best, machine, input_size),
            "fastest_throughput": best_thr["name"], "gflops_all_cores": many,
            "fraction_of_all_core_peak": many / peak_all if peak_all else None,
            "peak_assumption": f"{machine.get('cpu_mhz')} MHz x {machine.get('fp32_flops_per_cycle')} FLOP/cycle "
                               f"({machine.get('peak_assumption')}); nominal clock, turbo ignored"}


def summarize(result: dict[str, Any], baseline: str) -> None:
    """Add recommendations, targets and compute efficiency to a benchmark result, in place."""
    rows = result["rows"]
    result["recommendations"] = recommend(rows, result["settings"]["max_drop"], baseline)
    result["targets"] = targets(rows, baseline)
    result["runtime_ratios"] = runtime_ratios(rows, result["machine"], result["data"]["input_size"])
    result["compute"] = compute_efficiency(rows, result["machine"], result["data"]["input_size"])
