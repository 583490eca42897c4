"""Write the quantization report as Markdown + JSON + PNG (+ the raw logits, so every figure can be
recomputed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from train.atomic import atomic_path, write_json, write_text
from train.metrics import agreement_interval

MB = 1e6


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _subset(d: dict[str, Any]) -> str:
    total = d.get("split_images") or d["n_images"]
    return (f" (a seeded subset of {total} with classes in turn, as equal as the split allows: accuracy weighs "
            f"each class about equally, not as the whole split does)" if d["n_images"] < total else "")


def _summary(rep: dict[str, Any]) -> list[str]:
    rows = ["| variant | runtime | engine | accuracy | Δ acc (pts) | macro-F1 | top-1 agreement | flipped | "
            "mean abs logit err | max prob change | size (MB) | size / float | latency (ms) | speedup | "
            "speedup vs same-runtime float |", "|" + "---|" * 15]
    for name, v in rep["variants"].items():
        m, lat = v["metrics"], v.get("latency") or {}
        rows.append(f"| {name} | {v['runtime']} | {v['engine'] or '-'} | {100 * m['accuracy']:.2f}% | "
                    f"{m['accuracy_change_points']:+.2f} | {m['macro_f1']:.4f} | {100 * m['top1_agreement']:.2f}% | "
                    f"{m['flipped_images']} | {m['mean_abs_logit_error']:.4f} | {m['max_prob_change']:.4f} | "
                    f"{v['size_bytes'] / MB:.2f} | {v['size_ratio']:.3f} | {_f(lat.get('median_ms'))} | "
                    f"{_f(v.get('speedup_vs_float'), '.1f')}x | {_f(v.get('speedup_vs_runtime_float'), '.1f')}x |")
    return rows


def _targets(rep: dict[str, Any]) -> list[str]:
    t = rep["targets"]
    rows = ["| static variant | agreement ≥ 99.5% | acc drop ≤ 0.3 | no class recall drop > 1 | "
            "size ≤ 0.27 | speedup ≥ 3x |", "|---|---|---|---|---|---|"]
    ok = lambda b: "yes" if b else "**NO**"  # noqa: E731
    for name, v in rep["variants"].items():
        if "static" not in name:
            continue
        m = v["metrics"]
        worst = max(0.0, *(-d["recall_change_points"] for d in m["per_class"].values()))
        lo = m.get("top1_agreement_ci95", [None])[0]
        rows.append(f"| {name} | {ok(m['top1_agreement'] >= t['min_top1_agreement'])}"
                    f"{f' (95% CI from {100 * lo:.2f}%)' if lo is not None else ''} | "
                    f"{ok(-m['accuracy_change_points'] <= t['max_accuracy_drop_points'])} | "
                    f"{ok(worst <= t['max_class_recall_drop_points'])} (worst {worst:.2f}) | "
                    f"{ok(v['size_ratio'] <= t['max_size_ratio'])} | "
                    f"{_speedup_cell(v, t['min_speedup'])} |")
    return rows


def _how_sure(rep: dict[str, Any]) -> list[str]:
    """Each int8 variant's agreement and accuracy change as the sample they come from allows: an exact 95%
    interval of the agreement, and the accuracy change as the paired images it is made of (McNemar)."""
    n = rep["data"]["n_images"]
    target = rep["targets"]["min_top1_agreement"]
    rows = ["| variant | top-1 agreement (95% CI) | float right, now wrong | float wrong, now right | "
            "McNemar p |", "|---|---|---|---|---|"]
    for name, v in rep["variants"].items():
        m = v["metrics"]
        if v.get("precision", "int8") == "fp32" or "top1_agreement_ci95" not in m:
            continue
        lo, hi = m["top1_agreement_ci95"]
        pc = m["accuracy_change_paired"]
        rows.append(f"| {name} | {100 * m['top1_agreement']:.2f}% ({100 * lo:.2f}-{100 * hi:.2f}) | "
                    f"{pc['float_right_now_wrong']} | {pc['float_wrong_now_right']} | {pc['mcnemar_p']:.2f} |")
    most = _most_flips_clearing(n, target)
    reach = (f"An interval whose lower end clears {100 * target:.1f}% needs at most {most} flipped image(s) here"
             if most is not None else f"No interval can clear {100 * target:.1f}% on {n} images, even with no flip")
    return rows + ["", f"On {n} images one flip is {100 / max(n, 1):.2f} points of agreement. {reach}; a larger "
                   f"val split (or all of it, where --max-images cut it) narrows every interval. An accuracy "
                   f"change is the difference of the two paired counts; a McNemar p well above 0.05 means these "
                   f"images cannot tell the two models' accuracy apart."]


def _most_flips_clearing(n: int, target: float) -> int | None:
    """The most flipped images out of n whose agreement interval still lies above `target` (None: not even 0);
    fewer flips only raise the interval, so the first count that fails ends the search."""
    flips = 0
    while flips <= n and agreement_interval(n - flips, n)[0] >= target:
        flips += 1
    return flips - 1 if flips else None


def _speedup_cell(v: dict[str, Any], target: float) -> str:
    """Own-engine speedup, plus the same file loaded under another engine (a qnnpack model on x86)."""
    own = v.get("speedup_vs_float") or 0.0
    cell = ("yes" if own >= target else "**NO**") + f" ({own:.1f}x)"
    others = [f"{x:.1f}x loaded under {e}" for e, x in (v.get("speedup_vs_float_loaded_under") or {}).items()]
    return cell + (f"; {', '.join(others)}" if others else "")


def _per_class(rep: dict[str, Any]) -> list[str]:
    names = list(rep["variants"])
    rows = ["| class (n) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    base = rep["variants"]["float"]["metrics"]["per_class"]
    for c, b in base.items():
        cells = []
        for n in names:
            d = rep["variants"][n]["metrics"]["per_class"][c]
            cells.append(f"R {100 * d['recall']:.1f} ({d['recall_change_points']:+.1f}) / "
                         f"P {100 * d['precision']:.1f} ({d['precision_change_points']:+.1f})")
        rows.append(f"| {c} ({b['support']}) | " + " | ".join(cells) + " |")
    return rows


def _flips(rep: dict[str, Any]) -> list[str]:
    classes = rep["data"]["class_names"]
    out = []
    for name, v in rep["variants"].items():
        m = v["metrics"]
        if v["precision"] == "fp32" and m["flipped_images"] == 0:
            continue
        out.append(f"**{name}**: {m['flipped_images']} of {m['n_images']} images change class.")
        if m["flipped_images"]:
            out += ["", "| float \\ int8 | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            out += [f"| {c} | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(classes, m["flip_matrix"])]
        out.append("")
    return out


def _sensitivity(rep: dict[str, Any]) -> list[str]:
    s = rep["sensitivity"]
    b = s["budget_points"]
    within = [n for n, why in s.get("checked", {}).items() if n not in s["runs"]]
    out = []
    if within:
        out += [f"Within the budget (accuracy drop ≤ {b['accuracy']} points, no class recall drop > "
                f"{b['class_recall']} points, top-1 agreement ≥ {100 * b['min_top1_agreement']:.1f}%), so no layer "
                f"kept in float: {', '.join(f'**{n}**' for n in within)}."
                + ("" if s["runs"] else " Pass --sensitivity to run the analysis anyway."), ""]
    for base, r in s["runs"].items():
        b, f = rep["variants"][base], rep["variants"][r["fallback"]]
        lat_b, lat_f = (b.get("latency") or {}).get("median_ms"), (f.get("latency") or {}).get("median_ms")
        reasons = "; ".join(r.get("reasons") or ["over budget" if r["over_budget"] else "forced"])
        out += [f"**{base}** ({reasons}; {r['method']}). "
                f"Most sensitive layers:", "", "| rank | layer | mean abs logit error | agreement |",
                "|---|---|---|---|"]
        out += [f"| {x['rank']} | {x['layer']} | {x['mean_abs_logit_error']:.4f} | {100 * x['top1_agreement']:.1f}% |"
                for x in r["ranking"][:8]]
        tried = r.get("attempts") or []
        if len(tried) > 1:
            out += ["", "Attempts (layers kept in float, each twice as many as the last while a target was missed): "
                    + "; ".join(f"{len(t['keep_float'])} layers: agreement {100 * t['top1_agreement']:.2f}%"
                                for t in tried) + "."]
        out += ["", f"Fallback **{r['fallback']}** keeps {r['keep_float']} in float: accuracy "
                f"{100 * f['metrics']['accuracy']:.2f}% ({f['metrics']['accuracy_change_points']:+.2f} pts vs float; "
                f"full int8 {b['metrics']['accuracy_change_points']:+.2f}), agreement "
                f"{100 * f['metrics']['top1_agreement']:.2f}%. Cost: size {f['size_bytes'] / MB:.2f} MB vs "
                f"{b['size_bytes'] / MB:.2f} MB, latency {_f(lat_f)} ms vs {_f(lat_b)} ms. "
                + ("It meets every target." if r.get("fallback_meets_targets")
                   else "It still misses: " + "; ".join(r.get("fallback_misses") or []) + "."), ""]
    return out


def _machine(m: dict[str, Any]) -> str:
    restricted = m.get("isa_restricted_by")
    return (f"{m.get('cpu_model')} ({m.get('arch')}), int8 features {', '.join(m.get('int8_flags') or []) or 'none'}"
            + (f", kernels restricted by {restricted}" if restricted else ""))


def _markdown(rep: dict[str, Any]) -> str:
    d, c, t = rep["data"], rep["calibration"], rep["timing"]
    lines = [
        "# Quantization report", "",
        *(["> **SYNTHETIC images**: these figures come from images the toolkit generated, not from X-rays; "
           "they exercise the pipeline and say nothing about accuracy on real data.", ""]
          if d.get("images_origin") == "synthetic" else []),
        f"- checkpoint: `{rep['checkpoint']['path']}` (sha256 {str(rep['checkpoint']['sha256'])[:12]}…)",
        f"- evaluated on: `{d['root']}` split **{d['split']}** ({d['split_source']}), {d['n_images']} images"
        f"{_subset(d)}, "
        f"per class {dict(zip(d['class_names'], d['class_counts']))}",
        f"- calibration: {c['size']} images sampled (seed {c['seed']}) from the **train** split only; "
        f"ONNX Runtime method {c['onnx_method']}",
        *[f"- {e}: activations {o['activation']}; weights {o['weight']}"
          for e, o in c.get("torch_observers", {}).items()],
        f"- x86 int8 target (--x86-isa {c.get('x86_isa_requested', 'auto')}): torch "
        f"{c.get('x86_isa', {}).get('torch')}, ONNX Runtime {c.get('x86_isa', {}).get('onnxruntime')} "
        f"(avx2 = saturation-free on every x86-64 CPU; vnni = exact only with VNNI/AMX)",
        f"- measured on: {_machine(rep.get('machine') or {})}",
        f"- latency: batch {t['batch']}, {t['threads']} thread, median of {t['runs']} runs in interleaved rounds "
        f"(all variants in the same run, {t['cpu_count']} CPUs, shared machine: absolute figures are noisy)",
        f"- torch {rep['torch_version']}", "",
        "## Summary", "", *_summary(rep), "",
        "Δ acc is in percentage points against the float model; speedup is PyTorch float latency / variant "
        "latency (ONNX rows also against ONNX float, same runtime).", "",
        "## What each variant quantized (read from the models)", "",
        "| variant | what was quantized |", "|---|---|",
        *[f"| {n} | {v['touched'].get('summary', '')} |" for n, v in rep["variants"].items()], "",
        "PyTorch dynamic int8 quantizes only `nn.Linear` (the final fc in ResNet-18), so the model barely "
        "shrinks; ONNX Runtime's dynamic mode also quantizes every Conv (ConvInteger). Static variants "
        "quantize weights and activations of every conv/linear.", "",
        "## Targets (static int8)", "", *_targets(rep), "",
        "## How sure these figures are", "", *_how_sure(rep), "",
        "## Per-class recall (R) and precision (P), % (change in points)", "", *_per_class(rep), "",
        "## Flip matrices (rows: float prediction, columns: int8 prediction)", "", *_flips(rep),
        "## Latency, every timed row", "", "| model | engine setting | median ms | p90 ms | speedup vs float |",
        "|---|---|---|---|---|",
        *[f"| {k} | {k.split('@')[1] if '@' in k else rep['variants'].get(k, {}).get('engine') or '-'} | "
          f"{v['median_ms']:.2f} | {v['p90_ms']:.2f} | {v['speedup_vs_float']:.1f}x |"
          for k, v in t["all"].items()], "",
        t["torch_engine_note"] + ".", "",
        "## Per-layer sensitivity and float fallback", "", *_sensitivity(rep), "",
        "## Settings", "", *[f"- **{n}**: {v['settings']}" for n, v in rep["variants"].items()], "",
        "## Gate", "",
    ]
    g = rep["gate"]
    if g["max_drop_points"] is None:
        lines.append("No --max-drop given: nothing gated.")
    else:
        lines.append(f"--max-drop {g['max_drop_points']}: " + ("passed." if g["passed"] else "FAILED:"))
        lines += [f"- {v}" for v in g["violations"]]
    return "\n".join(lines) + "\n"


def _png(rep: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["variants"])
    vs = [rep["variants"][n] for n in names]
    classes = rep["data"]["class_names"]
    fig, ax = plt.subplots(1, 3, figsize=(18, 5.5))
    x = np.arange(len(names))
    ax[0].bar(x - 0.2, [100 * v["metrics"]["accuracy"] for v in vs], 0.4, label="accuracy %")
    ax[0].bar(x + 0.2, [100 * v["metrics"]["top1_agreement"] for v in vs], 0.4, label="agreement with float %")
    lo = min(100 * min(v["metrics"]["accuracy"], v["metrics"]["top1_agreement"]) for v in vs)
    ax[0].set_ylim(max(0, lo - 5), 100.5)
    ax[0].set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    ax[0].legend(fontsize=8)
    ax[0].set_title("accuracy and top-1 agreement")
    w = 0.8 / max(1, len(classes))
    for i, c in enumerate(classes):
        ax[1].bar(x + (i - len(classes) / 2 + 0.5) * w,
                  [v["metrics"]["per_class"][c]["recall_change_points"] for v in vs], w, label=c)
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    ax[1].set_title("recall change vs float (points)")
    ax[1].legend(fontsize=8)
    for n, v in zip(names, vs):
        if v.get("latency"):
            ax[2].scatter(v["size_bytes"] / MB, v["latency"]["median_ms"])
            ax[2].annotate(n, (v["size_bytes"] / MB, v["latency"]["median_ms"]), fontsize=7)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("size (MB)")
    ax[2].set_ylabel("latency, batch 1, 1 thread (ms, median)")
    ax[2].set_title("size vs latency")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_report(rep: dict[str, Any], logits: dict[str, np.ndarray], labels: np.ndarray, out_dir: Path,
                 extra_md: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rep["files"] = {k: str(out_dir / f) for k, f in (("markdown", "report.md"), ("json", "report.json"),
                                                    ("png", "report.png"), ("logits", "logits.npz"))}
    with atomic_path(out_dir / "logits.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, labels=labels, **logits)
    _png(rep, out_dir / "report.png")
    write_text(out_dir / "report.md", _markdown(rep) + "\n![summary](report.png)\n" + extra_md)
    write_json(out_dir / "report.json", rep)
