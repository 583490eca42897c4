"""The evaluation report's figures: confusion matrix, one-vs-rest ROC curves, training curves (PNG, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, dest: Path) -> str:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return dest.name


def confusion_png(cm: Sequence[Sequence[int]], class_names: Sequence[str], dest: Path) -> str:
    plt = _pyplot()
    cm = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2, 1.2 * k + 1.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    return _save(fig, dest)


def roc_png(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
            aucs: Sequence[float | None], dest: Path) -> str:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    y = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(class_names):
        if aucs[k] is None:
            continue  # one-vs-rest needs both positives and negatives
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[k]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, dest)


def curves_png(history: Sequence[dict[str, Any]], dest: Path) -> str:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a1.set_title("loss per epoch")
    a2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    a2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    a2.plot(epochs, [h["val_macro_f1"] for h in history], "s--", label="val macro-F1")
    a2.set_title("accuracy per epoch")
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.legend()
        a.grid(alpha=0.3)
    return _save(fig, dest)
