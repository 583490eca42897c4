"""Scores for benchmark rows (accuracy, macro-F1, per-class recall, agreement with the float model, all from
train.metrics) and the compressed size an app download would see."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.metrics import agreement_interval, compare_logits


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


def classification_scores(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and recall per class in percent (the benchmark's tables are in points), from the
    toolkit's one metrics module."""
    from train.metrics import classification_metrics

    m = classification_metrics(labels, logits, class_names)
    return {"accuracy": 100 * m["accuracy"], "macro_f1": 100 * m["macro_f1"],
            "recall": [100 * m["per_class"][c]["recall"] for c in class_names]}


def score_rows(rows: list[dict[str, Any]], logits: dict[str, np.ndarray], labels: np.ndarray,
               class_names: Sequence[str], baseline: str, class_error: str | None) -> None:
    """Fill accuracy and change-from-float columns in place (percentage points)."""
    ref = logits.get(baseline)
    base = classification_scores(ref, labels, class_names) if ref is not None and not class_error else None
    for row in rows:
        out = logits.get(row["name"])
        if out is None:
            continue
        if ref is not None:
            cmp = compare_logits(ref, out)
            row["top1_agreement"], row["max_abs_logit_diff"] = cmp["top1_agreement"], cmp["max_abs_logit_diff"]
            agreed = int((ref.argmax(1) == out.argmax(1)).sum())
            row["top1_agreement_ci95"] = list(agreement_interval(agreed, len(ref)))
            row["n_images"] = int(len(ref))
        if class_error:
            row.update(status="failed", reason=class_error)
            continue
        s = classification_scores(out, labels, class_names)
        row.update(accuracy=s["accuracy"], macro_f1=s["macro_f1"],
                   recall={c: r for c, r in zip(class_names, s["recall"])})
        if base is not None:
            changes = [a - b for a, b in zip(s["recall"], base["recall"])]
            worst = int(np.argmin(changes))
            row.update(accuracy_change=s["accuracy"] - base["accuracy"], macro_f1_change=s["macro_f1"] - base["macro_f1"],
                       worst_recall_change=changes[worst], worst_recall_class=class_names[worst])
