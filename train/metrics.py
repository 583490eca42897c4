"""Predictions and classification metrics shared by per-epoch validation and the evaluation report."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from train.data import ImageDataset, Sample
from train.spec import PreprocessSpec


@torch.no_grad()
def predict_logits(model: torch.nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *,
                   device: torch.device, batch_size: int = 64, workers: int = 0, progress: bool = False,
                   desc: str = "predict", channels_last: bool = False,
                   autocast: torch.dtype | None = None) -> np.ndarray:
    """(N, classes) float32 logits of a model that takes [0, 1] input, in `samples` order.

    fp32 by default: the report on a saved checkpoint describes the fp32 weights every exporter reads.
    `autocast` (the training run's AMP dtype) is for per-epoch validation, where speed matters more than
    the last digit."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(ImageDataset(samples, spec), batch_size=batch_size,
                                         shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    out = []
    for x, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out.append(model(x).float().cpu())
    model.train(was_training)
    n = spec.num_classes
    return torch.cat(out).numpy() if out else np.zeros((0, n), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: Sequence[int], logits: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall(sensitivity)/F1/support/one-vs-rest AUC, confusion
    matrix (rows = true class, columns = predicted), and the mean cross-entropy. Macro-F1 averages the classes
    with images here (`macro_classes`): a class the split lacks has no F1 to average, and counting it as 0 took
    a quarter off a 4-class split's macro-F1."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    labels = list(range(len(class_names)))
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {}
    for k, name in enumerate(class_names):
        positives = int((y == k).sum())
        auc = float(roc_auc_score(y == k, probs[:, k])) if 0 < positives < len(y) else None
        per_class[name] = {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                           "support": int(s[k]), "auc": auc}
    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else 0.0
    return {
        "n": int(len(y)),
        "loss": loss,
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro_f1": float(np.mean(f[s > 0])) if (s > 0).any() else 0.0,
        "macro_classes": [name for name, n in zip(class_names, s) if n > 0],
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely an artifact reproduces the float model: the figures every verification and report uses."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return {
        "n_images": int(reference.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "max_prob_change": float(np.abs(softmax(reference.astype(np.float64))
                                        - softmax(candidate.astype(np.float64))).max()),
    }


def flip_matrix(ref_logits: np.ndarray, cand_logits: np.ndarray, n_classes: int) -> list[list[int]]:
    """Counts [float class][candidate class]: the diagonal is agreement, everything off it a flipped image."""
    m = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(m, (ref_logits.argmax(1), cand_logits.argmax(1)), 1)
    return m.tolist()


def agreement_interval(agreed: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a top-1 agreement of `agreed` in `n` images: how far the rate on
    a val split of this size may be from the rate on images like it. On 819 images, 1 flip gives 99.32-100%."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(agreed, n).proportion_ci(confidence, method="exact")
    return float(ci.low), float(ci.high)


def paired_change(labels: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """An accuracy change between two models on the same images is made of the images one got right and the
    other wrong: their counts, and the exact McNemar test's two-sided p (the chance of a split at least this
    uneven if neither model were better). A change of 0.12 points is 1 image of 819, with p = 1."""
    from scipy.stats import binomtest

    ref_right, cand_right = ref.argmax(1) == labels, cand.argmax(1) == labels
    lost, gained = int((ref_right & ~cand_right).sum()), int((~ref_right & cand_right).sum())
    p = float(binomtest(lost, lost + gained, 0.5).pvalue) if lost + gained else 1.0
    return {"float_right_now_wrong": lost, "float_wrong_now_right": gained, "mcnemar_p": p}


def against_float(labels: np.ndarray, ref: np.ndarray, cand: np.ndarray,
                  class_names: Sequence[str]) -> dict[str, Any]:
    """A candidate (int8, another runtime) scored on labelled images, with its change from the float
    model in points, its agreement and its flips."""
    base = classification_metrics(labels, ref, class_names)
    own = classification_metrics(labels, cand, class_names)
    for c, d in own["per_class"].items():
        d["recall_change_points"] = 100 * (d["recall"] - base["per_class"][c]["recall"])
        d["precision_change_points"] = 100 * (d["precision"] - base["per_class"][c]["precision"])
    cmp = compare_logits(ref, cand)
    flips = flip_matrix(ref, cand, len(class_names))
    agreed = int(np.trace(np.asarray(flips)))
    return {
        **own,
        "accuracy_change_points": 100 * (own["accuracy"] - base["accuracy"]),
        "macro_f1_change_points": 100 * (own["macro_f1"] - base["macro_f1"]),
        "top1_agreement": cmp["top1_agreement"],
        "top1_agreement_ci95": list(agreement_interval(agreed, len(labels))),
        "accuracy_change_paired": paired_change(np.asarray(labels), ref, cand),
        "flipped_images": int(len(labels) - agreed),
        "flip_matrix": flips,
        "mean_abs_logit_error": cmp["mean_abs_logit_diff"],
        "max_abs_logit_error": cmp["max_abs_logit_diff"],
        "max_prob_change": cmp["max_prob_change"],
        "n_images": int(len(labels)),
    }
