"""Where does the model look? Grad-CAM / EigenCAM overlays plus a shortcut audit, as a report section.

`write_explanations` is what `python -m train.evaluate --explain N` embeds; `run_explain` writes the
same section as the standalone `python -m train.explain` report with ROC curves. The float-vs-int8
comparison is passed in as an `Int8Comparison` by the entry point, because `train` sits below
`quantize` in the layers and must not import it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from train.checkpoint import Checkpoint
from train.data import DatasetIndex, Sample, load_batch
from train.explain.audit import (BAND, area_shares, cohort_audit, mass_shares, mean_or_none, plot_roc,
                                 source_audit)
from train.explain.maps import (METHOD_TITLES, METHODS, float_cams, overlay, save_grid, save_png,
                                select_per_class)
from train.explain.report import REGIONS, explanations_markdown, limits, standalone_markdown

log = logging.getLogger(__name__)

GRID_MAX_COLS = 6


class Int8Comparison(Protocol):
    """The float-vs-int8 heatmap step of `run_explain`, built by `python -m train.explain --int8`."""

    def check(self) -> None:
        """Raise a ToolkitError for unusable settings, before minutes of float work."""

    def __call__(self, ckpt: Checkpoint, index: DatasetIndex, samples: list[Sample], out_dir: Path,
                 per_class: int, progress: bool) -> tuple[str, dict]:
        """(Markdown section, JSON-able dict stored as the report's 'int8')."""


def predict_probs(model: torch.nn.Module, samples: Sequence[Sample], ckpt: Checkpoint,
                  batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Softmax probabilities (N, classes) of a [0, 1]-input model over samples, in batches."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(samples), batch_size), desc="predicting", unit="batch",
                  disable=not progress, leave=False):
        x = torch.from_numpy(load_batch(samples[i:i + batch_size], ckpt.spec))
        with torch.inference_mode():
            out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, ckpt.spec.num_classes), np.float32)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _save_overlays(out_dir: Path, chosen: list[Sample], x: np.ndarray, maps: dict[str, np.ndarray],
                   probs: np.ndarray, names: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """Per-image overlay PNGs per method and one grid per method (rows = true class)."""
    rows, grids = [], {}
    for i, s in enumerate(chosen):
        pred = int(probs[i].argmax())
        row = {"path": str(s.path), "true": names[s.label], "pred": names[pred],
               "prob": float(probs[i, pred]), "source": s.source}
        for m in METHODS:
            rel = f"cam/{m}/{i:03d}_{_slug(names[s.label])}_{_slug(Path(s.path).stem)}.png"
            save_png(out_dir / rel, overlay(x[i], maps[m][i]))
            row[m] = {**mass_shares(maps[m][i]), "png": rel}
        rows.append(row)
    labels = sorted({s.label for s in chosen})
    for m in METHODS:
        tiles, titles = [], []
        for lab in labels:
            idx = [i for i, s in enumerate(chosen) if s.label == lab][:GRID_MAX_COLS]
            tiles.append([overlay(x[i], maps[m][i]) for i in idx])
            titles.append([f"{'ok' if rows[i]['pred'] == rows[i]['true'] else 'WRONG'}: "
                           f"{rows[i]['pred'][:16]} {rows[i]['prob']:.2f}" for i in idx])
        grids[m] = f"cam/{m}_grid.png"
        save_grid(out_dir / grids[m], tiles, titles, [names[lab] for lab in labels],
                  f"{METHOD_TITLES[m]} on layer4 (target: predicted class); row = true class")
    return rows, grids


def _mass_by_class(rows: list[dict], names: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in names:
        mine = [r for r in rows if r["true"] == name]
        if mine:
            out[name] = {m: {**{k: mean_or_none([r[m][k] for r in mine]) for k in REGIONS}, "n": len(mine)}
                         for m in METHODS}
    return out


def write_explanations(ckpt: Checkpoint, index: DatasetIndex, samples: Sequence[Sample], out_dir: Path,
                       per_class: int = 2, *, probs: np.ndarray | None = None, seed: int = 0,
                       progress: bool = True) -> tuple[str, dict]:
    """Heatmap overlays for `per_class` seeded images per class, border-mass shares and the source /
    cohort audit over all `samples`. Returns (Markdown section, JSON-able dict); pass `probs` (softmax
    over `samples`, in order) when already computed to skip a second pass."""
    out_dir = Path(out_dir)
    samples = list(samples)
    names = index.class_names
    deploy = ckpt.build_deploy_model()
    if probs is None:
        probs = predict_probs(deploy, samples, ckpt, progress=progress)
    preds = probs.argmax(axis=1)
    chosen = select_per_class(samples, per_class, seed)
    pos = {s.path: i for i, s in enumerate(samples)}
    chosen_probs = probs[[pos[s.path] for s in chosen]]
    x = load_batch(chosen, ckpt.spec)
    maps = float_cams(deploy, torch.from_numpy(x), chosen_probs.argmax(axis=1).tolist(), progress=progress)
    rows, grids = _save_overlays(out_dir, chosen, x, maps, chosen_probs, names)
    size = ckpt.spec.input_size
    result = {
        "methods": list(METHODS), "layer": "net.layer4[-1]", "target": "predicted class",
        "package": _gradcam_version(), "per_class": per_class, "seed": seed, "input_size": size,
        "regions": {"band_fraction": BAND, "band_px": max(1, round(BAND * size)),
                    "area_share": area_shares(size, size)},
        "grids": grids, "images": rows, "mass_by_class": _mass_by_class(rows, names),
        "n_eval": len(samples),
        "accuracy": float((preds == np.asarray([s.label for s in samples])).mean()) if samples else None,
        "source_audit": source_audit(index, samples, preds),
        "cohort_audit": cohort_audit(index, samples, preds),
        "limits": limits(size),
    }
    return explanations_markdown(result, names), result


def _gradcam_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"grad-cam {version('grad-cam')}"
    except PackageNotFoundError:
        return "grad-cam (version unknown)"


def run_explain(checkpoint: str | Path, data: str | Path, *, split: str = "val", per_class: int = 4,
                out_dir: str | Path = Path("reports/explain"), int8: Int8Comparison | None = None,
                seed: int = 0, progress: bool = True) -> dict:
    """The standalone explanation report: ROC curves, heatmaps, shortcut audit and, when `int8` is
    given, its float-vs-int8 section. Writes explain.json and explain.md under `out_dir`."""
    from train.atomic import write_json, write_text
    from train.checkpoint import load_checkpoint, training_split
    from train.data import DataError, labelled_splits

    if per_class < 1:
        raise DataError(f"--per-class must be at least 1, got {per_class}")
    if int8 is not None:
        int8.check()  # fail before minutes of work, not after
    out_dir = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    index = labelled_splits(training_split(ckpt, data), class_names=ckpt.spec.class_names)
    if index.split_generated:
        log.warning("%s names no split; using the toolkit's seeded split (seed 0)", data)
    samples = index.require_split(split)
    probs = predict_probs(ckpt.build_deploy_model(), samples, ckpt, progress=progress)
    labels = np.asarray([s.label for s in samples])
    roc = plot_roc(labels, probs, index.class_names, out_dir / "roc.png")
    section, result = write_explanations(ckpt, index, samples, out_dir, per_class, probs=probs, seed=seed,
                                         progress=progress)
    report = {"checkpoint": str(checkpoint), "checkpoint_sha256": ckpt.sha256, "data": str(data),
              "split": split, "roc": {**roc, "png": "roc.png"}, "explanations": result}
    sections = [section]
    if int8 is not None:
        md, report["int8"] = int8(ckpt, index, samples, out_dir, per_class, progress)
        sections.append(md)
    write_json(out_dir / "explain.json", report)
    write_text(out_dir / "explain.md", standalone_markdown(report, sections))
    return report
