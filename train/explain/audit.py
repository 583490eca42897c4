"""Numbers for the shortcut audit: where heatmap mass falls, how alike two heatmaps are, and how much
of the accuracy the image's source (or cohort) alone could explain. Plain NumPy, no torch."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from train.data import DatasetIndex, Sample

log = logging.getLogger(__name__)

BAND = 0.125  # outer band: 28 px at 224, so the central chest region is the inner 75% x 75%
TOP_FRACTION = 0.2


def region_masks(height: int, width: int, band: float = BAND) -> dict[str, np.ndarray]:
    """Boolean masks: 'border' (outer band, corners included), 'corners' (the four band x band
    squares) and 'centre' (everything inside the band)."""
    by, bx = max(1, round(band * height)), max(1, round(band * width))
    yy, xx = np.mgrid[0:height, 0:width]
    edge_y = (yy < by) | (yy >= height - by)
    edge_x = (xx < bx) | (xx >= width - bx)
    border = edge_y | edge_x
    return {"border": border, "corners": edge_y & edge_x, "centre": ~border}


def mass_shares(cam: np.ndarray, band: float = BAND) -> dict[str, float | None]:
    """Share of the map's total (non-negative) mass in each region; None for an all-zero map."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = cam.sum()
    masks = region_masks(*cam.shape, band=band)
    if total <= 0:
        return {k: None for k in masks}
    return {k: float(cam[m].sum() / total) for k, m in masks.items()}


def area_shares(height: int, width: int, band: float = BAND) -> dict[str, float]:
    """What each region's mass share would be for a flat map: the yardstick for mass_shares."""
    return {k: float(m.mean()) for k, m in region_masks(height, width, band).items()}


def top_mask(cam: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Exactly ceil(fraction * pixels) highest pixels (stable ranking, so ties cannot inflate it)."""
    flat = np.asarray(cam, dtype=np.float64).ravel()
    k = int(np.ceil(fraction * flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(np.shape(cam))


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Intersection over union of the two maps' top-`fraction` regions."""
    ma, mb = top_mask(a, fraction), top_mask(b, fraction)
    return float((ma & mb).sum() / max(1, (ma | mb).sum()))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pixel-wise correlation; None when either map is flat (correlation undefined)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def source_baseline(train: Sequence[Sample], evaluate: Sequence[Sample]) -> dict:
    """Predict the class from the source alone: majority class per source on `train`, scored on
    `evaluate`. Sources unseen in `train` get the overall majority class."""
    fit = [s for s in train if s.source]
    overall = Counter(s.label for s in train).most_common(1)[0][0] if train else 0
    per_source: dict[str, Counter] = {}
    for s in fit:
        per_source.setdefault(s.source, Counter())[s.label] += 1
    rule = {src: c.most_common(1)[0][0] for src, c in per_source.items()}
    scored = [s for s in evaluate if s.source]
    hits = [rule.get(s.source, overall) == s.label for s in scored]
    return {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits),
            "rule": dict(sorted(rule.items())), "fallback_label": int(overall),
            "unseen_sources": sorted({s.source for s in scored} - set(rule))}


def group_table(samples: Sequence[Sample], preds: np.ndarray, groups: Sequence[str | None],
                class_names: Sequence[str]) -> dict[str, dict]:
    """Per group (source or cohort): n, model accuracy and class counts; None groups are 'unspecified'."""
    out: dict[str, dict] = {}
    for s, p, g in zip(samples, preds, groups):
        row = out.setdefault(g or "unspecified", {"n": 0, "correct": 0,
                                                  "classes": {c: 0 for c in class_names}})
        row["n"] += 1
        row["correct"] += int(p == s.label)
        row["classes"][class_names[s.label]] += 1
    for row in out.values():
        row["accuracy"] = row.pop("correct") / row["n"]
    return dict(sorted(out.items()))


def source_audit(index: DatasetIndex, samples: Sequence[Sample], preds: np.ndarray) -> dict | None:
    """Per-source accuracy plus the source-only baseline; None when the data names no sources."""
    if not any(s.source for s in samples):
        return None
    eval_paths = {s.path for s in samples}
    train = [s for s in index.split("train") if s.path not in eval_paths] if index.has_split else []
    fit_on = "train split"
    if not train:
        train, fit_on = [s for s in index.samples if s.path not in eval_paths], "images outside the eval set"
    if not train:
        train, fit_on = list(samples), "the eval set itself (in-sample: optimistic)"
    labels = np.asarray([s.label for s in samples])
    majority = Counter(s.label for s in train).most_common(1)[0][0]
    return {"per_source": group_table(samples, preds, [s.source for s in samples], index.class_names),
            "baseline": {**source_baseline(train, samples), "fit_on": fit_on},
            "model_accuracy": float((preds == labels).mean()),
            "majority_class_accuracy": float((labels == majority).mean())}


def cohort_audit(index: DatasetIndex, samples: Sequence[Sample], preds: np.ndarray) -> dict | None:
    """Accuracy per cohort where the data's CSV has a 'cohort' column (cxr4 does); None otherwise."""
    if not any(s.cohort for s in samples):
        return None
    return {"per_cohort": group_table(samples, preds, [s.cohort for s in samples], index.class_names)}


def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], dest: Path) -> dict:
    """One-vs-rest AUC per class and the ROC plot (drawn by train.plots, shared with train.evaluate).
    Returns {'auc': {class: AUC or None}, 'macro_auc'}; a class absent from the split has no AUC."""
    from sklearn.metrics import roc_auc_score

    from train.plots import roc_png

    aucs: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        y = labels == i
        aucs[name] = float(roc_auc_score(y, probs[:, i])) if 0 < y.sum() < len(y) else None
    roc_png(labels, probs, class_names, list(aucs.values()), dest)
    return {"auc": aucs, "macro_auc": mean_or_none(list(aucs.values()))}
