"""What int8 must keep against the float model: one definition read by the quantization report, every
int8 verification at export and the benchmark's recommendations."""

from __future__ import annotations

from typing import Any

TARGETS = {"min_top1_agreement": 0.995, "max_accuracy_drop_points": 0.3, "max_class_recall_drop_points": 1.0,
           "max_size_ratio": 0.27, "min_speedup": 3.0}
MIN_TOP1_AGREEMENT = TARGETS["min_top1_agreement"]


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
