"""Markdown for the explanation report: heatmap grids, region-mass table, source/cohort audit, limits."""

from __future__ import annotations

from typing import Sequence

from train.explain.maps import METHOD_TITLES, METHODS

REGIONS = ("border", "corners", "centre")
LIMITS = [
    "Border/corner mass is a symptom to look at, not a proof: a model can use a shortcut that sits in "
    "the centre (patient size, pediatric anatomy, exposure, a source's processing), and mass at the border "
    "can be harmless (e.g. the lung apices and costophrenic angles reach the band).",
    "Grad-CAM and EigenCAM answer different questions (evidence for the target class vs. the dominant "
    "activation pattern); neither shows causal use, and both are computed on a handful of images. "
    "EigenCAM's sign is an SVD convention (here: agree with the summed activation); where that is "
    "ambiguous the map shows the complement of the pattern.",
    "The source-only baseline measures confounding in the data (how much a rule 'source -> class' "
    "scores), not what the model uses. A model can match it without using the source, and a model "
    "above it may still rely on source cues.",
    "Per-source and per-cohort accuracies on small groups are noisy; check n before reading a gap.",
    "High accuracy on confounded data is not evidence of clinical skill.",
]


def limits(input_size: int) -> list[str]:
    """The audit's caveats; the first states this model's actual heatmap resolution."""
    cells = max(1, input_size // 32)
    return [f"Layer4 heatmaps are coarse: a {cells}x{cells} grid at {input_size} px (each cell 32 px) "
            "upsampled bilinearly, so they locate a region, not a structure; a text marker and a lung edge "
            "inside the same cell look alike.", *LIMITS]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def explanations_markdown(r: dict, names: Sequence[str]) -> str:
    """The report section for a write_explanations result."""
    area = r["regions"]["area_share"]
    lines = [
        "## Where the model looks: Grad-CAM and EigenCAM", "",
        f"{r['per_class']} seeded image(s) per class; heatmaps on `{r['layer']}` of the deployed float "
        f"model ([0, 1] input, normalization inside) via {r['package']}; Grad-CAM targets the predicted "
        f"class. EigenCAM's sign (arbitrary in an SVD) is fixed so the map agrees with the summed "
        f"activation. Per-image overlays are under `cam/<method>/`.", "",
    ]
    for m in METHODS:
        lines += [f"### {METHOD_TITLES[m]}", "", f"![{METHOD_TITLES[m]} grid]({r['grids'][m]})", ""]
    lines += [
        "### Heatmap mass by region (mean per true class)", "",
        f"Border = outer {100 * r['regions']['band_fraction']:.1f}% band ({r['regions']['band_px']} px), "
        f"corners included; corners = the four band-sized squares; centre = the rest (central chest). "
        f"A flat map would put {_pct(area['border'])} in the border, {_pct(area['corners'])} in the corners "
        f"and {_pct(area['centre'])} in the centre: values well above the border/corner area share deserve "
        f"a look at the overlays.", "",
        "| class | n | Grad-CAM border | Grad-CAM corners | Grad-CAM centre | EigenCAM border | "
        "EigenCAM corners | EigenCAM centre |", "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in r["mass_by_class"].items():
        cells = [_pct(d[m][k]) for m in METHODS for k in REGIONS]
        lines.append(f"| {name} | {d['gradcam']['n']} | " + " | ".join(cells) + " |")
    lines += ["", *_source_markdown(r), "### What this audit can and cannot show", ""]
    lines += [f"- {t}" for t in r["limits"]] + [""]
    return "\n".join(lines)


def _group_rows(table: dict, names: Sequence[str]) -> list[str]:
    out = ["| group | n | model accuracy | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for g, row in table.items():
        out.append(f"| {g} | {row['n']} | {_pct(row['accuracy'])} | "
                   + " | ".join(str(row["classes"][c]) for c in names) + " |")
    return out


def _source_markdown(r: dict) -> list[str]:
    sa, ca = r["source_audit"], r["cohort_audit"]
    lines = ["## Shortcut audit: image source and cohort", ""]
    if sa is None:
        return lines + ["The data names no source per image, so no source audit was possible.", ""]
    b = sa["baseline"]
    cls_names = list(next(iter(sa["per_source"].values()))["classes"])
    lines += [
        f"On {r['n_eval']} evaluation images the model scores {_pct(sa['model_accuracy'])}. A rule that "
        f"predicts the class from the image's **source alone** (majority class per source, fit on the "
        f"{b['fit_on']}) scores **{_pct(b['accuracy'])}**; always predicting the most common class scores "
        f"{_pct(sa['majority_class_accuracy'])}. The gap between the majority-class and source-only figures "
        f"is how much of the accuracy the source *could* explain.", "",
        "Accuracy per source (class counts per source show the confounding):", "",
        *_group_rows(sa["per_source"], cls_names), "",
    ]
    if b["unseen_sources"]:
        lines += [f"Sources not seen in the fit set: {', '.join(b['unseen_sources'])}.", ""]
    if ca is not None:
        lines += ["Accuracy per cohort (from the CSV's `cohort` column):", "",
                  *_group_rows(ca["per_cohort"], cls_names), ""]
    return lines


def standalone_markdown(report: dict, sections: list[str]) -> str:
    """The whole `python -m train.explain` report: header, ROC, then the given sections."""
    roc = report["roc"]
    expl = report["explanations"]
    aucs = " | ".join("n/a" if v is None else f"{v:.3f}" for v in roc["auc"].values())
    macro = "n/a" if roc["macro_auc"] is None else f"{roc['macro_auc']:.3f}"
    acc = "n/a" if expl["accuracy"] is None else f"{100 * expl['accuracy']:.1f}%"
    head = [
        "# Explanation report", "",
        f"Checkpoint `{report['checkpoint']}` (sha256 `{(report['checkpoint_sha256'] or '')[:12]}`), data "
        f"`{report['data']}`, split `{report['split']}` ({expl['n_eval']} images), accuracy {acc}.", "",
        "## One-vs-rest ROC", "",
        "![ROC curves](roc.png)", "",
        "| " + " | ".join(roc["auc"]) + " | macro |", "|" + "---|" * (len(roc["auc"]) + 1),
        f"| {aucs} | {macro} |", "",
    ]
    return "\n".join(head) + "\n" + "\n".join(sections)
