"""Scores for benchmark rows: accuracy, macro-F1, per-class recall, agreement with the float model, and
the compressed size an app download would see."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class _CountingSink(io.RawIOBase):
    """A write-only file that only counts bytes, so compressing a 45 MB model needs no buffer."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)


def compressed_size(path: Path, level: int = 6) -> int:
    """gzip size of a file, or tar.gz size of a directory (an .mlpackage)."""
    sink = _CountingSink()
    if path.is_dir():
        with tarfile.open(fileobj=sink, mode="w:gz", compresslevel=level) as tar:
            tar.add(path, arcname=path.name)
        return sink.n
    with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=level, mtime=0) as gz, open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            gz.write(chunk)
    return sink.n


def classification_scores(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and recall per class (percent), from argmax predictions."""
    from sklearn.metrics import f1_score, recall_score

    pred = logits.argmax(1)
    ids = list(range(num_classes))
    return {"accuracy": float((pred == labels).mean() * 100),
            "macro_f1": float(f1_score(labels, pred, labels=ids, average="macro", zero_division=0) * 100),
            "recall": [float(r * 100) for r in recall_score(labels, pred, labels=ids, average=None,
                                                             zero_division=0)]}


def score_rows(rows: list[dict[str, Any]], logits: dict[str, np.ndarray], labels: np.ndarray,
               class_names: Sequence[str], baseline: str, class_error: str | None) -> None:
    """Fill accuracy and change-from-float columns in place (percentage points)."""
    ref = logits.get(baseline)
    base = classification_scores(ref, labels, len(class_names)) if ref is not None and not class_error else None
    for row in rows:
        out = logits.get(row["name"])
        if out is None:
            continue
        if ref is not None:
            row["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
            row["max_abs_logit_diff"] = float(np.abs(out.astype(np.float64) - ref).max())
        if class_error:
            row.update(status="failed", reason=class_error)
            continue
        s = classification_scores(out, labels, len(class_names))
        row.update(accuracy=s["accuracy"], macro_f1=s["macro_f1"],
                   recall={c: r for c, r in zip(class_names, s["recall"])})
        if base is not None:
            changes = [a - b for a, b in zip(s["recall"], base["recall"])]
            worst = int(np.argmin(changes))
            row.update(accuracy_change=s["accuracy"] - base["accuracy"], macro_f1_change=s["macro_f1"] - base["macro_f1"],
                       worst_recall_change=changes[worst], worst_recall_class=class_names[worst])
