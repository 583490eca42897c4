"""Evaluate a checkpoint on labelled images: Markdown + JSON + PNG report.

    python -m train.evaluate --checkpoint runs/NAME/best.pt --data DIR_OR_CSV [--split val] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dataclasses import replace

from train.atomic import check_writable_dir
from train.data import DataError, DatasetIndex, check_images, discover, file_digest, images_origin, lookalikes
from train.lookalike import LOOKALIKE_BITS
from train.errors import cli_errors
from train.cpu import fit_torch_threads
from train.memory import keep_freed_memory

log = logging.getLogger(__name__)

CAVEAT = (
    "**What this does not show.** These numbers measure agreement with the dataset's labels on this "
    "split, nothing more. On cxr4 (and the public COVID-19 radiography collections it comes from) class and "
    "source are confounded: every Viral Pneumonia image is pediatric, Lung_Opacity comes from a single "
    "source (RSNA), and each class moves together with its source collection. A model can score highly by "
    "recognising the source or the patient's age instead of the disease, so accuracy here is not clinical "
    "evidence of diagnostic skill; that needs external, source-balanced data and a clinical study."
)
SPLIT_CHOICES = ("train", "val", "test", "all")


def _select(idx: DatasetIndex, split: str):
    if split not in SPLIT_CHOICES:
        raise DataError(f"--split must be one of {SPLIT_CHOICES}, got {split!r}")
    if split == "all":
        return list(idx.samples)
    if not idx.has_split:
        raise DataError(f"{idx.root}: the data has no split column; pass --split all, or pass the run's "
                        f"splits.csv as --data to evaluate its {split} split")
    return idx.require_split(split)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | DatasetIndex, *, split: str = "val",
                        out_dir: str | Path = Path("reports/evaluate"), explain_per_class: int = 0,
                        batch_size: int = 64, workers: int = 0, device: str = "auto",
                        progress: bool = True, data_root: str | Path | None = None,
                        skip_bad: bool = False, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Predict every image of `split`, compute the metrics and write report.md, metrics.json and PNGs.
    `history`: the training curves to plot (default: the checkpoint's, which for best.pt ends at its epoch)."""
    from train.checkpoint import load_checkpoint, training_split
    from train.distributed import resolve_device
    from train.metrics import classification_metrics, predict_logits, softmax

    ckpt = load_checkpoint(checkpoint)
    names = ckpt.spec.class_names
    given = data.root if isinstance(data, DatasetIndex) else Path(data)
    if not isinstance(data, DatasetIndex):  # the data it was trained on: by the split training made
        data = training_split(ckpt, data) if data_root is None else data
    split_file = None if isinstance(data, DatasetIndex) or Path(data) == given else str(data)
    idx = data if isinstance(data, DatasetIndex) else discover(data, class_names=names, data_root=data_root)
    if tuple(idx.class_names) != tuple(names):
        raise DataError(f"data classes {list(idx.class_names)} differ from the checkpoint's {list(names)}")
    samples = _select(idx, split)
    seen = copies_of_train_images(idx, samples) if split in ("val", "test") else 0
    if seen:
        log.warning("%d of the %d %s images are byte-identical to train images: these metrics overstate how the "
                    "model does on unseen images", seen, len(samples), split)
    alike = lookalikes_of_train_images(idx, samples, progress) if split in ("val", "test") else 0
    trained_patients = {s.patient for s in idx.split("train") if s.patient is not None}
    of_patients = sum(s.patient in trained_patients for s in samples) if split in ("val", "test") else 0
    if of_patients:
        log.warning("%d of the %d %s images are of patients with train images: these metrics overstate how the "
                    "model does on unseen patients", of_patients, len(samples), split)
    if alike:
        log.warning("%d of the %d %s images look like train images (one radiograph re-encoded, resized or "
                    "re-contrasted): these metrics overstate how the model does on unseen images",
                    alike, len(samples), split)
    if not isinstance(data, DatasetIndex):  # an index from training was checked already
        idx = check_images(replace(idx, samples=samples), skip_bad=skip_bad, progress=progress)
        samples = idx.samples
    dev = resolve_device(device)
    model = ckpt.build_deploy_model().to(dev)
    logits = predict_logits(model, samples, ckpt.spec, device=dev, batch_size=batch_size, workers=workers,
                            progress=progress, desc=f"evaluate {split}")
    y = [s.label for s in samples]
    metrics = classification_metrics(y, logits, names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = history if history is not None else (ckpt.meta.get("history") or [])
    figures = _figures(out_dir, metrics, y, softmax(logits), names, history)
    result = {"checkpoint": str(checkpoint), "checkpoint_sha256": ckpt.sha256, "data": str(given),
              "split_file": split_file,
              "split": split, "spec": ckpt.spec.to_dict(), "metrics": metrics, "figures": figures,
              "history": history, "skipped_images": [p for p, _ in idx.skipped],
              "unknown_classes": idx.unknown_classes,
              "synthetic_data": images_origin(samples) == "synthetic", "copies_of_train_images": seen,
              "lookalikes_of_train_images": alike, "images_of_train_patients": of_patients,
              "washed_out_images": _washed_out(idx, samples)}
    md = render_markdown(result)
    if explain_per_class > 0:
        md += "\n" + _explanations(ckpt, idx, samples, out_dir, explain_per_class, result,
                                    probs=softmax(logits), progress=progress)
    from train.atomic import write_json, write_text

    write_json(out_dir / "metrics.json", result)
    write_text(out_dir / "report.md", md)
    log.info("wrote %s (accuracy %.4f, macro-F1 %.4f)", out_dir / "report.md", metrics["accuracy"],
             metrics["macro_f1"])
    return result


def lookalikes_of_train_images(idx: DatasetIndex, samples, progress: bool = False) -> int:
    """How many of `samples` look like an image of the train split without being a byte-identical copy
    (train.lookalike): the model has seen that radiograph."""
    train = idx.split("train")
    return len({i for i, _, _ in lookalikes(samples, progress, against=train)})


def copies_of_train_images(idx: DatasetIndex, samples) -> int:
    """How many of `samples` are byte-identical to an image of the train split: the model has seen those."""
    train = {file_digest(s.path) for s in idx.split("train")} - {None}
    return sum(1 for s in samples if file_digest(s.path) in train) if train else 0


def _washed_out(idx: DatasetIndex, samples) -> list[dict[str, str]]:
    """The evaluated images whose 8-bit conversion lost most of them (check_images found them)."""
    evaluated = {str(s.path) for s in samples}
    return [{"path": p, "lost": lost} for p, lost in idx.washed_out if p in evaluated]


def _figures(out_dir: Path, metrics, y, probs, names, history) -> dict[str, str]:
    from train import plots

    figs = {"confusion_matrix": plots.confusion_png(metrics["confusion_matrix"], names,
                                                    out_dir / "confusion_matrix.png"),
            "roc": plots.roc_png(y, probs, names, [metrics["per_class"][c]["auc"] for c in names],
                                 out_dir / "roc_curves.png")}
    if history and all("val_loss" in h for h in history):
        figs["training_curves"] = plots.curves_png(history, out_dir / "training_curves.png")
    return figs


def _explanations(ckpt, idx, samples, out_dir: Path, per_class: int, result: dict, **kw) -> str:
    from train.explain import run as explain_run

    md, info = explain_run.write_explanations(ckpt, idx, samples, out_dir, per_class=per_class, **kw)
    result["explanations"] = info
    return md


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_markdown(r: dict[str, Any]) -> str:
    m, names = r["metrics"], r["spec"]["class_names"]
    lines = [f"# Evaluation: {Path(r['checkpoint']).name} on the {r['split']} split", ""]
    if r["synthetic_data"]:
        lines += ["> The images evaluated here are SYNTHETIC (generated by train.synthetic), not radiographs.", ""]
    if r.get("copies_of_train_images"):
        lines += [f"> {r['copies_of_train_images']} of these {m['n']} {r['split']} images are byte-identical to "
                  f"images of the train split: the model trained on them, so these metrics overstate how it does on "
                  f"unseen images. Keep each image in one split.", ""]
    if r.get("lookalikes_of_train_images"):
        lines += [f"> {r['lookalikes_of_train_images']} of these {m['n']} {r['split']} images look like images of "
                  f"the train split (the same radiograph re-encoded, resized or re-contrasted; perceptual hashes "
                  f"within {LOOKALIKE_BITS} of 256 bits): the model trained on them, so these metrics overstate how "
                  f"it does on unseen images. Keep each radiograph in one split.", ""]
    if r.get("unknown_classes"):
        left_out = ", ".join(f"`{n}` ({k} images)" for n, k in r["unknown_classes"].items())
        lines += [f"> Left out: class folder(s) {left_out}, not classes of this model: these metrics cover only "
                  f"its classes.", ""]
    if r.get("images_of_train_patients"):
        lines += [f"> {r['images_of_train_patients']} of these {m['n']} {r['split']} images are of patients who also "
                  f"have images in the train split: these metrics overstate how the model does on unseen patients. "
                  f"Keep each patient in one split (a split the toolkit generates does, from the CSV's patient "
                  f"column).", ""]
    lines += [f"- checkpoint: `{r['checkpoint']}` (sha256 `{r['checkpoint_sha256'][:16]}…`)",
              f"- data: `{r['data']}`, split `{r['split']}`"
              + (f" (as training split it: `{r['split_file']}`)" if r.get("split_file") else "")
              + f", {m['n']} images",
              f"- preprocessing: input {r['spec']['input_size']} px, resize {r['spec']['resize']}, "
              f"contrast stretch {r['spec']['contrast_stretch']}", "",
              f"**Accuracy {m['accuracy']:.4f}**, macro-F1 {m['macro_f1']:.4f}"
              + (f" (over the {len(m['macro_classes'])} classes with images in this split)"
                 if len(m.get("macro_classes", names)) < len(names) else "") + ", "
              f"macro one-vs-rest ROC AUC {_fmt(m['macro_auc'])}, mean cross-entropy {m['loss']:.4f}", "",
              "| class | precision | recall (sensitivity) | F1 | ROC AUC (one-vs-rest) | images |",
              "|---|---|---|---|---|---|"]
    for c in names:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | "
                     f"{_fmt(pc['auc'])} | {pc['support']} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted class):", "",
              "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(names, m["confusion_matrix"])]
    lines += ["", f"![confusion matrix]({r['figures']['confusion_matrix']})", "",
              f"![one-vs-rest ROC curves]({r['figures']['roc']})", ""]
    if "training_curves" in r["figures"]:
        lines += ["Training curves (from the checkpoint's history):", "",
                  f"![training curves]({r['figures']['training_curves']})", ""]
    if r.get("washed_out_images"):
        first = r["washed_out_images"][0]
        lines += [f"{len(r['washed_out_images'])} image(s) lost most of their gray levels in the conversion to 8 "
                  f"bits (e.g. `{first['path']}`: {first['lost']}); see the warning in the log.", ""]
    if r["skipped_images"]:
        lines += [f"Skipped {len(r['skipped_images'])} unreadable image(s): "
                  + ", ".join(f"`{p}`" for p in r["skipped_images"][:20]), ""]
    lines += [CAVEAT, ""]
    return "\n".join(lines)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt (toolkit, torchvision or notebook)")
    p.add_argument("--data", required=True, help="data folder (any supported layout) or CSV path,label[,split]")
    p.add_argument("--data-root", default=None, help="folder CSV paths are relative to (default: the CSV's)")
    p.add_argument("--split", default="val", choices=SPLIT_CHOICES, help="which split to evaluate (default val)")
    p.add_argument("--out", default="reports/evaluate", help="report folder (default reports/evaluate)")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="also write N Grad-CAM explanations per class (needs train.explain)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in the report)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="default auto")
    a = p.parse_args(argv)
    check_writable_dir(a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    fit_torch_threads()
    r = evaluate_checkpoint(a.checkpoint, a.data, split=a.split, out_dir=Path(a.out),
                            explain_per_class=a.explain, batch_size=a.batch_size, workers=a.workers,
                            device=a.device, data_root=a.data_root, skip_bad=a.skip_bad)
    print(f"accuracy {r['metrics']['accuracy']:.4f}  macro-F1 {r['metrics']['macro_f1']:.4f}  "
          f"report {Path(a.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
