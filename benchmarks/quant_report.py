"""The quantization report: float vs every int8 variant on the same images, each in its own runtime.

Answers what int8 costs before it ships: which classes lose recall, which images flip, how much
smaller and faster each variant is, and (when a static variant misses the budget) which layers to
keep in float. Writes report.md, report.json, report.png and logits.npz into `out_dir`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks import quant_variants as builders
from benchmarks.timing import time_interleaved
from quantize import torch_ao
from quantize.targets import budget_violations, exceeds
from quantize.onnx_rt import CALIB_METHODS
from quantize.targets import TARGETS
from quantize.torch_ao import QuantizationError
from quantize.variants import load_calibration
from train.checkpoint import load_checkpoint, training_split
from train.cpu import cpu_description
from train.data import DataError, images_origin, labelled_splits, seeded_subset
from train.errors import ToolkitError
from train.metrics import against_float

log = logging.getLogger(__name__)



class ReportError(ToolkitError, ValueError):
    """Bad input to the report (flag or data); the message names it and says what to do."""


def _eval_images(index, split: str, max_images: int | None, seed: int, spec, progress: bool):
    from tqdm import tqdm

    from train.spec import load_unit_image

    if split == "train":
        raise ReportError("--split train would evaluate on the images calibration samples from; use --split "
                          "val (or test)")
    samples = index.require_split(split)
    total = len(samples)
    if max_images:
        samples = seeded_subset(samples, max_images, seed)
    images = np.stack([load_unit_image(s.path, spec) for s in tqdm(
        samples, desc=f"loading {split} images", unit="img", disable=not progress, leave=False)])
    return samples, images.astype(np.float32), np.array([s.label for s in samples]), total


def _record(v: builders.Variant, logits: np.ndarray, labels, ref, class_names, float_size: int) -> dict:
    return {"precision": v.precision, "runtime": v.runtime, "engine": v.engine, "size_bytes": v.size_bytes,
            "size_ratio": v.size_bytes / float_size, "settings": v.settings, "touched": v.touched,
            "path": str(v.path) if v.path else None,
            "metrics": against_float(labels, ref, logits, class_names)}


def _drop_budget(max_drop: float | None) -> tuple[float, float]:
    """(accuracy, class recall) points a static variant may lose: --max-drop for both, else the targets."""
    if max_drop is not None:
        return max_drop, max_drop
    return TARGETS["max_accuracy_drop_points"], TARGETS["max_class_recall_drop_points"]


def _misses(m: dict[str, Any], budget: tuple[float, float]) -> list[str]:
    """Why a static variant needs the float fallback: over the drop budget, or under the agreement target."""
    acc, cls = budget
    why = ([f"loses more than {acc} accuracy points or a class more than {cls} recall points"]
           if exceeds(m, acc, cls) else [])
    if m["top1_agreement"] < TARGETS["min_top1_agreement"]:
        why.append(f"top-1 agreement {100 * m['top1_agreement']:.2f}% is under "
                   f"{100 * TARGETS['min_top1_agreement']:.1f}%")
    return why


STATIC_PREFIXES = ("torch_static_int8_", "onnx_int8_static")


def _is_static(name: str) -> bool:
    return name.startswith(STATIC_PREFIXES) and not name.endswith("_fallback")


def _rank_layers(v: builders.Variant, ckpt, calib, *, sample, layers, progress, reduce_range) -> list[dict[str, Any]]:
    """Per-layer sensitivity in the variant's own runtime: torch modules, or ONNX Runtime nodes."""
    from quantize.onnx_rt import node_sensitivity
    from quantize.sensitivity import layer_sensitivity

    if v.runtime == "onnxruntime":
        return node_sensitivity(v.path.with_name("model.onnx"), calib, sample_size=sample, progress=progress,
                                x86_isa=v.settings["x86_isa"])
    return layer_sensitivity(ckpt, calib, v.engine, sample_size=sample, layers=layers, progress=progress,
                             reduce_range=reduce_range)


def _fallback_variant(v: builders.Variant, ckpt, calib, keep, *, threads, progress, reduce_range) -> builders.Variant:
    if v.runtime == "onnxruntime":
        return builders.onnx_static_fallback(v, calib, keep, threads, progress)
    return builders.torch_static(ckpt, calib, v.engine, threads, keep_float=keep, progress=progress,
                                 suffix="_fallback", reduce_range=reduce_range)


def _escalation(k: int, layers: int, most: int = 8) -> list[int]:
    """How many layers each fallback attempt keeps in float: k, 2k, 4k, ... up to `most` (or every layer)."""
    out, n = [], max(1, k)
    while n <= min(most, layers):
        out.append(n)
        n *= 2
    return out or [min(max(1, k), layers)]


def _sensitivity(ckpt, calib, variants, results, logits, labels, *, budget, force, k, sample, layers, threads,
                 progress, reduce_range) -> dict[str, Any]:
    """For each static variant, torch and ONNX Runtime alike, that misses the budget or the agreement
    target (or all, when forced): rank layers in its own runtime, build a variant that keeps the k most
    sensitive in float, evaluate it. `checked` lists every static variant and why it needed no fallback."""
    from quantize.sensitivity import most_sensitive

    out: dict[str, Any] = {"budget_points": {"accuracy": budget[0], "class_recall": budget[1],
                                             "min_top1_agreement": TARGETS["min_top1_agreement"]},
                           "forced": force, "keep_float_layers": k, "runs": {}, "checked": {}}
    for v in [v for v in variants if _is_static(v.name)]:
        why = _misses(results[v.name]["metrics"], budget)
        out["checked"][v.name] = why or ["within budget and agreement target"]
        if not (force or why):
            continue
        ranking = _rank_layers(v, ckpt, calib, sample=sample, layers=layers if v.runtime != "onnxruntime" else None,
                               progress=progress, reduce_range=reduce_range)
        attempts = []
        for n in _escalation(k, len(ranking)):  # k layers, then twice as many, while the targets are missed
            keep = most_sensitive(ranking, n)
            fb = _fallback_variant(v, ckpt, calib, keep, threads=threads, progress=progress,
                                   reduce_range=reduce_range)
            fb_logits = builders.evaluate(fb, logits["__images__"], progress=progress)
            record = _record(fb, fb_logits, labels, logits["float"], ckpt.spec.class_names,
                             results["float"]["size_bytes"])
            fb_why = _misses(record["metrics"], budget)
            attempts.append({"keep_float": keep, "top1_agreement": record["metrics"]["top1_agreement"],
                             "accuracy_change_points": record["metrics"]["accuracy_change_points"],
                             "misses": fb_why})
            if not fb_why:
                break
        logits[fb.name], results[fb.name] = fb_logits, record
        variants.append(fb)
        out["runs"][v.name] = {"over_budget": bool(why), "reasons": why or ["forced (--sensitivity)"],
                               "ranking": ranking, "keep_float": keep, "fallback": fb.name, "attempts": attempts,
                               "fallback_meets_targets": not fb_why, "fallback_misses": fb_why,
                               "method": f"quantize one layer at a time in {v.runtime}, mean |logit - float logit| "
                                         f"on {min(sample, len(calib))} calibration (train) images"}
    return out


def _cam(cam: int, ckpt, variants, eval_samples, out_dir: Path) -> tuple[str, dict]:
    from quantize.cam_compare import compare_float_int8

    static = [v for v in variants if v.name.startswith("torch_static_int8_") and v.module is not None]
    target = next((v for v in static if v.engine == "qnnpack"), static[0] if static else None)
    if target is None:
        return "\n## Grad-CAM float vs int8\n\nNo static int8 torch model was built.\n", {}
    torch_ao.set_engine(target.engine)
    md, data = compare_float_int8(ckpt, target.module, eval_samples, out_dir, per_class=cam)  # beside report.md
    return md, {"int8_variant": target.name, **data}


def _check_args(calib_method: str, engines: Sequence[str], reduce_range: str, latency_runs: int) -> None:
    """Every option that can be wrong is rejected before any work."""
    if calib_method not in CALIB_METHODS:
        raise ReportError(f"--calib-method must be one of {CALIB_METHODS}, got {calib_method!r}")
    if not engines:
        raise ReportError("--engines needs at least one quantized engine, e.g. qnnpack,x86")
    for e in engines:
        torch_ao.check_engine(e)
    torch_ao.resolve_x86_isa(reduce_range)
    if latency_runs < 1:
        raise ReportError("--latency-runs must be at least 1")


def _int8_setup(engines: Sequence[str], reduce_range: str) -> dict[str, Any]:
    """The observers, x86 target and kernel facts the int8 variants were built under, for the report."""
    return {"torch_observers": {e: torch_ao.qconfig_description(e, reduce_range) for e in engines},
            "reduce_range": reduce_range, "x86_isa_requested": reduce_range,
            "x86_isa": {"torch": torch_ao.resolve_x86_isa(reduce_range, "torch"),
                        "onnxruntime": torch_ao.resolve_x86_isa(reduce_range, "onnxruntime")},
            "cpu_has_vnni": torch_ao.cpu_has_vnni(),
            "int8_kernels_saturate": {e: torch_ao.int8_kernels_saturate(e) for e in engines}}


def _add_latency(results: dict[str, dict], variants: list, images: np.ndarray, runs: int,
                 threads: int) -> dict[str, dict]:
    """Time every variant side by side (benchmarks.timing) and add each one's speedups to its result."""
    latency = time_interleaved(builders.latency_fns(variants, images[0]), runs=runs)
    torch.set_num_threads(threads)
    for row in latency.values():
        row["speedup_vs_float"] = latency["float"]["median_ms"] / row["median_ms"]
    for name, r in results.items():
        r["latency"] = latency.get(name)
        r["speedup_vs_float"] = latency[name]["speedup_vs_float"] if name in latency else None
        same = "onnx_fp32" if r["runtime"] == "onnxruntime" else "float"  # vs the float model of its runtime
        r["speedup_vs_runtime_float"] = (latency[same]["median_ms"] / latency[name]["median_ms"]
                                         if name in latency and same in latency else None)
        r["speedup_vs_float_loaded_under"] = {k.split("@")[1]: v["speedup_vs_float"]
                                              for k, v in latency.items() if k.startswith(name + "@")}
    return latency


def _split_index(data: str | Path, class_names: Sequence[str]) -> tuple[Any, str]:
    """The data's images and where their split comes from: the data's own folders, else the stratified seeded
    split every stage makes for such data (seed 0, as training does by default). --seed draws the calibration
    images only: a split made with it put training images among the scored ones."""
    index = labelled_splits(data, class_names)
    if index.split_generated:
        return index, "generated: stratified seeded split (seed 0), as training does for such data"
    return index, "given by the data"


def _timing_section(latency_runs: int, latency: Any) -> dict[str, Any]:
    """How the latency column was measured, next to the figures."""
    return {"batch": 1, "threads": 1, "runs": latency_runs, "statistic": "median", "order": "interleaved rounds",
            "cpu_count": os.cpu_count(),
            "torch_engine_note": "'@engine' rows time the int8 model saved as TorchScript and loaded with that "
                                 "engine set, which re-packs its weights for that engine's kernels, as a server "
                                 "or app loading the file gets",
            "all": latency}


def run_quantization_report(checkpoint: str | Path, data: str | Path, *, split: str = "val",
                            out_dir: Path = Path("reports/quantize"), calib_size: int = 300,
                            calib_method: str = "MinMax", engines: Sequence[str] = ("qnnpack", "x86"),
                            max_drop: float | None = None, max_images: int | None = None, cam: int = 0,
                            sensitivity: bool = False, fallback_layers: int = 2, sensitivity_sample: int = 32,
                            sensitivity_layers: Sequence[str] | None = None,
                            latency_runs: int = 30, threads: int = 2, seed: int = 0,
                            reduce_range: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Build, evaluate, time and compare every variant; write the report; return its JSON dict.
    `report['gate']['passed']` is False when `max_drop` is given and some variant breaks it."""
    from benchmarks.quant_render import write_report

    _check_args(calib_method, engines, reduce_range, latency_runs)
    ckpt = load_checkpoint(checkpoint)
    index, split_note = _split_index(training_split(ckpt, data), ckpt.spec.class_names)
    torch.set_num_threads(threads)
    eval_samples, images, labels, split_total = _eval_images(index, split, max_images, seed, ckpt.spec, progress)
    calib_samples, calib = load_calibration(index, calib_size, ckpt.spec, seed=seed, progress=progress)

    variants = [builders.float_variant(ckpt, threads), builders.torch_dynamic(ckpt, engines[0], threads)]
    variants += [builders.torch_static(ckpt, calib, e, threads, progress=progress, reduce_range=reduce_range)
                 for e in engines]
    variants += builders.onnx_variants(ckpt, calib, calib_method, Path(out_dir) / "models", threads, progress,
                                       x86_isa=reduce_range)
    logits: dict[str, np.ndarray] = {v.name: builders.evaluate(v, images, progress=progress) for v in variants}
    classes = ckpt.spec.class_names
    float_size = variants[0].size_bytes
    results = {v.name: _record(v, logits[v.name], labels, logits["float"], classes, float_size) for v in variants}

    budget = _drop_budget(max_drop)
    logits["__images__"] = images
    sens = _sensitivity(ckpt, calib, variants, results, logits, labels, budget=budget, force=sensitivity,
                        k=fallback_layers, sample=sensitivity_sample, layers=sensitivity_layers,
                        threads=threads, progress=progress, reduce_range=reduce_range)
    del logits["__images__"]

    latency = _add_latency(results, variants, images, latency_runs, threads)

    violations = budget_violations(results, max_drop) if max_drop is not None else []
    report = {
        "checkpoint": {"path": str(checkpoint), "sha256": ckpt.sha256, "source_format": ckpt.source_format},
        "data": {"root": str(index.root), "split": split, "split_source": split_note, "n_images": len(labels),
                 "images_origin": images_origin(eval_samples),
                 "split_images": split_total, "max_images": max_images,
                 "class_names": list(classes), "class_counts": np.bincount(labels, minlength=len(classes)).tolist()},
        "calibration": {"split": "train", "size": len(calib_samples), "requested": calib_size, "seed": seed,
                        "onnx_method": calib_method, **_int8_setup(engines, reduce_range),
                        "samples": [str(s.path) for s in calib_samples],
                        "sample_splits": sorted({str(s.split) for s in calib_samples})},
        "timing": _timing_section(latency_runs, latency),
        "machine": cpu_description(), "torch_version": torch.__version__, "variants": results, "sensitivity": sens,
        "targets": TARGETS,
        "gate": {"max_drop_points": max_drop, "violations": violations, "passed": not violations},
    }
    if cam > 0:
        cam_md, report["cam"] = _cam(cam, ckpt, variants, eval_samples, Path(out_dir))
    else:
        cam_md = ""
    write_report(report, logits, labels, Path(out_dir), cam_md)
    return report


__all__ = ["run_quantization_report", "ReportError", "QuantizationError", "DataError"]
