"""The figures the quantization report gives per variant, the release gate, and the latency timer.

Kept apart from the orchestration so tests can recompute every number from the saved logits.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

from export.runners import compare_logits


def classification(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall/precision (fractions) of one set of logits."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    pred = logits.argmax(1)
    k = list(range(len(class_names)))
    prec, rec, _, support = precision_recall_fscore_support(labels, pred, labels=k, zero_division=0)
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, labels=k, average="macro", zero_division=0)),
        "per_class": {c: {"recall": float(rec[i]), "precision": float(prec[i]), "support": int(support[i])}
                      for i, c in enumerate(class_names)},
    }


def flip_matrix(ref_logits: np.ndarray, cand_logits: np.ndarray, n_classes: int) -> list[list[int]]:
    """Counts [float class][int8 class]: the diagonal is agreement, everything off it a flipped image."""
    m = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(m, (ref_logits.argmax(1), cand_logits.argmax(1)), 1)
    return m.tolist()


def against_float(labels: np.ndarray, ref: np.ndarray, cand: np.ndarray,
                  class_names: Sequence[str]) -> dict[str, Any]:
    """Everything about one variant, including its change from the float model (in points)."""
    base = classification(labels, ref, class_names)
    own = classification(labels, cand, class_names)
    for c, d in own["per_class"].items():
        d["recall_change_points"] = 100 * (d["recall"] - base["per_class"][c]["recall"])
        d["precision_change_points"] = 100 * (d["precision"] - base["per_class"][c]["precision"])
    cmp = compare_logits(ref, cand)
    flips = flip_matrix(ref, cand, len(class_names))
    return {
        **own,
        "accuracy_change_points": 100 * (own["accuracy"] - base["accuracy"]),
        "macro_f1_change_points": 100 * (own["macro_f1"] - base["macro_f1"]),
        "top1_agreement": cmp["top1_agreement"],
        "flipped_images": int(len(labels) - np.trace(np.asarray(flips))),
        "flip_matrix": flips,
        "mean_abs_logit_error": cmp["mean_abs_logit_diff"],
        "max_abs_logit_error": cmp["max_abs_logit_diff"],
        "max_prob_change": cmp["max_prob_change"],
        "n_images": int(len(labels)),
    }


def budget_violations(variants: dict[str, dict[str, Any]], max_drop: float) -> list[str]:
    """Every variant losing more than `max_drop` accuracy points, or any class more recall points."""
    out = []
    for name, v in variants.items():
        m = v.get("metrics")
        if v.get("precision") == "fp32" or not m:
            continue
        if -m["accuracy_change_points"] > max_drop:
            out.append(f"{name}: accuracy drops {-m['accuracy_change_points']:.2f} points (budget {max_drop})")
        for c, d in m["per_class"].items():
            if -d["recall_change_points"] > max_drop:
                out.append(f"{name}: class {c!r} recall drops {-d['recall_change_points']:.2f} points "
                           f"(budget {max_drop})")
    return out


def exceeds(metrics: dict[str, Any], budget: float, class_budget: float | None = None) -> bool:
    """True when a variant loses more than `budget` accuracy points or any class more than
    `class_budget` (default: the same) recall points (used to trigger the sensitivity fallback)."""
    worst_class = max((-d["recall_change_points"] for d in metrics["per_class"].values()), default=0.0)
    limit = budget if class_budget is None else class_budget
    return -metrics["accuracy_change_points"] > budget or worst_class > limit


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int = 30, warmup: int = 3) -> dict[str, dict]:
    """Median/p90 milliseconds per call. The variants take turns within each round, so CPU contention
    from other processes spreads over all of them instead of penalising whichever ran last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)),
                "min_ms": min(v), "runs": len(v)} for k, v in samples.items()}
