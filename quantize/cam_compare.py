"""Does int8 change where the model looks? Float vs int8 heatmaps side by side, with numbers.

An int8 network has no gradients, so Grad-CAM cannot run on it as is. Both int8 maps here come from
the int8 model's own layer4 output (forward hook, dequantized) -- see `train.explain.maps`:
  * Grad-CAM via the exact identity for a global-average-pool + linear head (channel weights = the
    dequantized int8 fc row of the target class), i.e. what Grad-CAM would give with the gradient of
    the dequantized head;
  * EigenCAM (gradient-free by design) with the package's projection.
The float maps come from the grad-cam package itself; a check on the float model records how far the
hook path is from the package (it should be ~0), so differences are int8's, not the method's.
Both models are explained for the *float* model's predicted class, so maps are comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from train.checkpoint import Checkpoint
from train.data import Sample, load_batch
from train.explain.audit import TOP_FRACTION, mass_shares, mean_or_none, pearson, top_iou
from train.explain.maps import METHOD_TITLES, METHODS, float_cams, hooked_cams, overlay, save_grid, save_png
from train.explain.maps import select_per_class

log = logging.getLogger(__name__)

GRID_MAX_ROWS = 12
STATS = ("iou_top20", "pearson", "mean_abs_diff", "border_float", "border_int8")
METHOD_NOTE = (
    "**Method for int8.** Int8 kernels have no gradients, so int8 heatmaps are computed from the int8 "
    "model's own layer4 output (forward hook on `avgpool`, dequantized). Grad-CAM: for ResNet's "
    "global-average-pool + linear head the gradient of a class logit with respect to layer4 is the fc "
    "row of that class at every position, so Grad-CAM is exactly sum_k W[c,k] A_k; the int8 map uses "
    "the dequantized int8 fc weights and int8 activations. EigenCAM needs no gradient and uses the "
    "grad-cam package's projection. Float maps come from the grad-cam package; on the float model the "
    "hook path reproduces them to within `method_check_max_abs_diff` (below), so differences shown here "
    "come from int8, not from the method. Both models are explained for the float model's predicted class."
)


def _per_image(chosen: list[Sample], names: Sequence[str], fmaps: dict, qmaps: dict, f_pred: np.ndarray,
               q_pred: np.ndarray) -> list[dict]:
    rows = []
    for i, s in enumerate(chosen):
        row = {"path": str(s.path), "true": names[s.label], "float_pred": names[f_pred[i]],
               "int8_pred": names[q_pred[i]]}
        for m in METHODS:
            a, b = fmaps[m][i], qmaps[m][i]
            row[m] = {"iou_top20": top_iou(a, b), "pearson": pearson(a, b),
                      "mean_abs_diff": float(np.abs(a - b).mean()),
                      "border_float": mass_shares(a)["border"],
                      "border_int8": mass_shares(b)["border"]}
        rows.append(row)
    return rows


def _summary(rows: list[dict], names: Sequence[str]) -> dict:
    def stats(sel: list[dict]) -> dict:
        return {m: {k: mean_or_none([r[m][k] for r in sel]) for k in STATS} | {"n": len(sel)}
                for m in METHODS}

    present = [n for n in names if any(r["true"] == n for r in rows)]
    by_class = {n: stats([r for r in rows if r["true"] == n]) for n in present}
    agree = mean_or_none([float(r["float_pred"] == r["int8_pred"]) for r in rows])
    return {"overall": stats(rows), "by_class": by_class, "top1_agreement": agree}


def _write_pngs(out_dir: Path, chosen: list[Sample], x: np.ndarray, fmaps: dict, qmaps: dict,
                rows: list[dict], names: Sequence[str]) -> tuple[str, list[str]]:
    """Per-image strips (radiograph | float/int8 Grad-CAM | float/int8 EigenCAM) and one grid."""
    tiles, titles, labels, files = [], [], [], []
    per_label = max(1, GRID_MAX_ROWS // max(1, len({s.label for s in chosen})))  # every class in the grid
    seen: dict[int, int] = {}
    for i, s in enumerate(chosen):
        seen[s.label] = seen.get(s.label, 0) + 1
        gray = (np.transpose(x[i], (1, 2, 0)) * 255).astype(np.uint8)
        strip = [gray] + [overlay(x[i], maps[m][i]) for m in METHODS for maps in (fmaps, qmaps)]
        rel = f"cam_int8/{i:03d}_{Path(s.path).stem}.png"
        save_png(out_dir / rel, np.concatenate(strip, axis=1))
        files.append(rel)
        if seen[s.label] <= per_label:
            tiles.append(strip)
            titles.append(["radiograph"] + [f"{METHOD_TITLES[m]} {p}" + (f" IoU {rows[i][m]['iou_top20']:.2f}"
                                                                       if p == "int8" else "")
                                            for m in METHODS for p in ("float", "int8")])
            labels.append(f"{names[s.label]}")
    grid = "cam_int8/float_vs_int8_grid.png"
    save_grid(out_dir / grid, tiles, titles, labels, "float vs int8 heatmaps (target: float prediction)")
    return grid, files


def compare_float_int8(ckpt: Checkpoint, int8_model: nn.Module, samples: Sequence[Sample], out_dir: Path,
                       per_class: int = 2, *, seed: int = 0, progress: bool = True) -> tuple[str, dict]:
    """Float vs int8 Grad-CAM and EigenCAM on `per_class` seeded images per class: side-by-side PNGs,
    top-20% IoU and Pearson per image and per class. Returns (Markdown section, JSON-able dict)."""
    out_dir = Path(out_dir)
    names = ckpt.spec.class_names
    chosen = select_per_class(list(samples), per_class, seed)
    x = load_batch(chosen, ckpt.spec)
    xt = torch.from_numpy(x)
    deploy = ckpt.build_deploy_model()
    with torch.inference_mode():
        f_pred = deploy(xt).argmax(dim=1).numpy()
    fmaps = float_cams(deploy, xt, f_pred.tolist(), progress=progress)
    check, _, f_proj = hooked_cams(deploy, xt, f_pred.tolist(), progress=progress)
    qmaps, q_logits, q_proj = hooked_cams(int8_model.eval(), xt, f_pred.tolist(), progress=progress,
                                          align_to=f_proj)
    flips = int(((f_proj * q_proj).sum(axis=(1, 2)) < 0).sum())
    rows = _per_image(chosen, names, fmaps, qmaps, f_pred, q_logits.argmax(axis=1))
    grid, files = _write_pngs(out_dir, chosen, x, fmaps, qmaps, rows, names)
    result = {
        "method": {"gradcam": "int8: exact GAP+linear identity on hooked, dequantized layer4 output and "
                              "dequantized int8 fc weights; float: grad-cam GradCAM",
                   "eigencam": "int8: package get_2d_projection on hooked, dequantized layer4 output, "
                               "sign matched to the float projection; float: grad-cam EigenCAM (sign "
                               "fixed by summed activation)",
                   "target": "float model's predicted class"},
        "method_check_max_abs_diff": {m: float(np.abs(check[m] - fmaps[m]).max()) if len(x) else None
                                      for m in METHODS},
        "method_check_mean_abs_diff": {m: float(np.abs(check[m] - fmaps[m]).mean()) if len(x) else None
                                       for m in METHODS},
        "eigencam_sign_aligned": flips,
        "top_fraction": TOP_FRACTION, "per_class": per_class, "seed": seed,
        "images": rows, **_summary(rows, names), "grid": grid, "pngs": files,
    }
    return compare_markdown(result), result


def _f(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def compare_markdown(r: dict) -> str:
    """The report section for a compare_float_int8 result."""
    chk = ", ".join(f"{METHOD_TITLES[m]} max {v:.1e}" for m, v in r["method_check_max_abs_diff"].items()
                    if v is not None)
    lines = [
        "## Does int8 change where the model looks?", "", METHOD_NOTE, "",
        f"Method check (float model, grad-cam package vs hook path, abs difference of [0, 1] maps): {chk}. "
        f"Top-1 agreement float vs int8 on these images: {_f(r['top1_agreement'], True)}. EigenCAM's sign "
        f"is an SVD convention, so each int8 EigenCAM takes the sign that agrees with the float one; on "
        f"{r['eigencam_sign_aligned']} of {len(r['images'])} images the standalone orientation rule "
        f"would have picked opposite signs (complementary maps, IoU 0) -- a property of EigenCAM, not int8.",
        "",
        f"![float vs int8 heatmaps]({r['grid']})", "",
        f"IoU = overlap of the two maps' top-{int(100 * r['top_fraction'])}% pixels (1 = same region; two "
        f"unrelated maps average about 0.11). Pearson = pixel-wise correlation. |diff| = mean absolute "
        f"difference of the [0, 1] maps (compare with the method check above).", "",
        "| class | n | Grad-CAM IoU | Grad-CAM Pearson | Grad-CAM abs diff | EigenCAM IoU | "
        "EigenCAM Pearson | EigenCAM abs diff | border share float -> int8 (Grad-CAM) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in [*r["by_class"].items(), ("**all**", r["overall"])]:
        g, e = d["gradcam"], d["eigencam"]
        lines.append(f"| {name} | {g['n']} | {_f(g['iou_top20'])} | {_f(g['pearson'], digits=4)} | "
                     f"{_f(g['mean_abs_diff'])} | "
                     f"{_f(e['iou_top20'])} | {_f(e['pearson'], digits=4)} | {_f(e['mean_abs_diff'])} | "
                     f"{_f(g['border_float'], True)} -> {_f(g['border_int8'], True)} |")
    lines += ["", "Per-image strips (radiograph | float Grad-CAM | int8 Grad-CAM | float EigenCAM | int8 "
              "EigenCAM) are under `cam_int8/`.", ""]
    return "\n".join(lines)
