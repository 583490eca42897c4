"""Benchmark outputs: report.md (tables + decisions), report.json (every figure), report.csv, report.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from benchmarks.machine import describe
from benchmarks.summary import p50, summarize
from train.atomic import atomic_path, write_json, write_text

BASELINE = "pytorch_fp32"
CSV_FIELDS = ("name", "format", "precision", "runtime", "engine", "status", "reason", "note", "size_bytes",
              "gzip_bytes", "import_s", "load_s", "first_inference_ms", "latency_1t.p50_ms", "latency_1t.p90_ms",
              "latency_1t.p99_ms", "latency_all.p50_ms", "latency_all.p90_ms", "latency_all.p99_ms",
              "threads_all", "throughput_ips", "throughput_mode", "rss_before_load_mb", "peak_rss_b1_mb",
              "peak_rss_mb", "accuracy", "accuracy_change", "macro_f1", "macro_f1_change", "top1_agreement",
              "max_abs_logit_diff", "worst_recall_change", "worst_recall_class", "output_classes", "path")


def fmt(v: Any, spec: str = ".2f", signed: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return format(v, ("+" if signed else "") + spec)
    return str(v)


def _get(row: dict[str, Any], dotted: str) -> Any:
    v: Any = row
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _mb(b: int | None) -> str:
    return "—" if b is None else f"{b / 1e6:.1f}"


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| artifact | format | precision | runtime (engine) | status | size MB (gzip) | ms/img 1 thread | "
             "ms/img all cores | images/s | accuracy % | change pts | agreement | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thr = fmt(r.get("throughput_ips"), ".1f")
        if r.get("throughput_mode", "").startswith("looped"):
            thr += " (looped b1)"
        agree = r.get("top1_agreement", r.get("top1_agreement_manifest"))
        agree_s = fmt(agree, ".3f") + (" (export check)" if "top1_agreement_manifest" in r and not r.get("measured")
                                       and agree is not None else "")
        notes = r.get("reason") or r.get("note") or ""
        lines.append(f"| {r['name']} | {fmt(r.get('format'))} | {fmt(r.get('precision'))} | "
                     f"{fmt(r.get('runtime'))} ({r.get('engine') or 'default'}) | {r.get('status')} | "
                     f"{_mb(r.get('size_bytes'))} ({_mb(r.get('gzip_bytes'))}) | {fmt(p50(r))} | "
                     f"{fmt(p50(r, 'latency_all'))} | {thr} | {fmt(r.get('accuracy'))} | "
                     f"{fmt(r.get('accuracy_change'), signed=True)} | {agree_s} | {notes.replace('|', '/')} |")
    return lines


def detail_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| artifact | load s (+ Python import s) | first inference ms | 1 thread p90 / p99 ms | all cores p90 / p99 ms | "
             "peak RSS MB (b1 / all) | macro-F1 | F1 change | worst recall change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("measured"):
            continue
        worst = (f"{fmt(r.get('worst_recall_change'), signed=True)} ({r['worst_recall_class']})"
                 if r.get("worst_recall_class") else "—")
        lines.append(f"| {r['name']} | {fmt(r.get('load_s'))} (+{fmt(r.get('import_s'), '.1f')}) | {fmt(r.get('first_inference_ms'), '.1f')} | "
                     f"{fmt(_get(r, 'latency_1t.p90_ms'))} / {fmt(_get(r, 'latency_1t.p99_ms'))} | "
                     f"{fmt(_get(r, 'latency_all.p90_ms'))} / {fmt(_get(r, 'latency_all.p99_ms'))} | "
                     f"{fmt(r.get('peak_rss_b1_mb'), '.0f')} / {fmt(r.get('peak_rss_mb'), '.0f')} | "
                     f"{fmt(r.get('macro_f1'))} | {fmt(r.get('macro_f1_change'), signed=True)} | {worst} |")
    return lines


def decision_lines(result: dict[str, Any]) -> list[str]:
    rec, lines = result["recommendations"], []
    drop = rec["max_drop_points"]
    ph, sv = rec.get("phone"), rec.get("server")
    agree = 100 * rec["min_top1_agreement"]
    rule = f"verified on real images, within {drop} pts of float accuracy and >= {agree:.1f}% top-1 agreement"
    lines.append(f"- **Phones**: `{ph['name']}` — {ph['size_mb']:.1f} MB, {ph['p50_ms_1t']:.2f} ms/img at 1 thread, "
                 f"accuracy {ph['accuracy_change']:+.2f} pts{_agreement_s(ph)} (smallest mobile-runtime artifact {rule})"
                 if ph else f"- **Phones**: no measured mobile artifact is {rule}")
    lines.append(f"- **Servers**: `{sv['name']}` — {sv['throughput_ips']:.1f} images/s, accuracy "
                 f"{sv['accuracy_change']:+.2f} pts{_agreement_s(sv)} (highest throughput {rule})"
                 if sv else f"- **Servers**: no measured artifact is {rule}")
    for name, why in (rec.get("excluded") or {}).items():
        lines.append(f"- Not recommended: `{name}`: {why}")
    unmeasured = [r["name"] for r in result["rows"] if r.get("runtime") == "coreml" and not r.get("measured")]
    if unmeasured:
        lines.append(f"- Not considered (not executed on this OS): {', '.join(unmeasured)}; measure CoreML on macOS.")
    for t in result["targets"]:
        lines.append(f"- Target {t['result']}: {t['target']} — {t['detail']}")
    if result.get("compute"):
        lines.append(compute_line(result["compute"]))
    return lines


def _agreement_s(pick: dict[str, Any]) -> str:
    """The pick's agreement with the interval its image count allows (exact 95%, train.metrics)."""
    ci = pick.get("top1_agreement_ci95")
    if pick.get("top1_agreement") is None or not ci:
        return ""
    return (f", top-1 agreement {100 * pick['top1_agreement']:.2f}% (95% CI {100 * ci[0]:.2f}-{100 * ci[1]:.2f} "
            f"on {pick['n_images']} images)")


def compute_line(c: dict[str, Any]) -> str:
    """How close the fastest float file gets to the CPU: the measured GEMM ceiling first, then the nominal peak."""
    shares = [f"{c['fraction_of_gemm_ceiling']:.0%} of the fp32 GEMM ceiling measured on this core (see Runtime "
              f"ratios)"] if c.get("fraction_of_gemm_ceiling") else []
    shares += [f"{c['fraction_of_core_peak']:.0%} of its nominal peak"] if c["fraction_of_core_peak"] else []
    frac1 = f" = {' and '.join(shares)}" if shares else ""
    frac = f" = {c['fraction_of_all_core_peak']:.0%} of the all-core nominal peak" if c["fraction_of_all_core_peak"] else ""
    return (f"- Compute: {c['gflop_per_image']:.3f} GFLOP/image (ResNet-18: 1.82 G multiply-adds at 224, "
            f"x (input/224)^2). `{c['fastest_1t']}` achieves {c['gflops_1t']:.1f} GFLOP/s at 1 thread{frac1}; "
            f"`{c['fastest_throughput']}` {c['gflops_all_cores']:.1f} GFLOP/s at batch throughput{frac}. Nominal "
            f"peak: {c['peak_assumption']}; above 100% means the core ran faster than that clock.")


def ratio_table(result: dict[str, Any]) -> list[str]:
    """Per-runtime targets: float files against ONNX Runtime's float file, int8 files against their own."""
    ratios = result.get("runtime_ratios") or []
    if not ratios:
        return []
    lines = ["", "## Runtime ratios (batch 1, 1 thread, p50, this run)", "",
             "| artifact | against | measure | value | target | result | share of the CPU's GEMM ceiling |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['artifact']} | {r['against']} | {r['measure']} | {r['value']:.2f}x | {r['target']} | {r['result']} "
              f"| {_shares(r.get('ceiling_share'))} |" for r in ratios]
    return lines + ceiling_lines(result["machine"].get("gemm_ceiling"))


def _shares(pair: list[float | None] | None) -> str:
    return " / ".join("-" if s is None else f"{s:.0%}" for s in pair) if pair else "-"


def ceiling_lines(ceiling: dict[str, Any] | None) -> list[str]:
    """What the ceiling column means, with the ceiling itself (benchmarks.roofline)."""
    if not ceiling:
        return []
    if ceiling.get("error"):
        return ["", f"CPU GEMM ceiling: not measured ({ceiling['error']})."]
    return ["", f"CPU GEMM ceiling at 1 thread: fp32 {ceiling['fp32_gflops']:.1f} GFLOP/s, int8 "
                f"{ceiling['int8_gops']:.1f} GOP/s, so int8 can run at most about **{ceiling['int8_over_fp32']:.2f}x** "
                f"faster than fp32 on this CPU where both run at their kernels' peak ({ceiling['method']}). The last "
                f"column is each file's operations per second (ResNet-18's multiply-adds x 2 over its p50) as a share "
                f"of the ceiling for its precision: this file / the file it is compared with. An int8 speedup equals "
                f"the ceiling ratio times the ratio of those two shares."]


def markdown(result: dict[str, Any]) -> str:
    s, d, m = result["settings"], result["data"], result["machine"]
    head = [f"# Benchmarks: {d['n_images']} {d['split']} images from {d['data']} at {d['input_size']}x{d['input_size']}",
            "", f"Command: `{result.get('command') or 'run_benchmarks(...)'}`", "",
            f"Machine: {describe(m)}. Load average at the start: {m.get('load_average')}. Process niceness "
            f"{s['niceness']}. Latency on a shared or busy machine is inflated; re-run on a quiet one to quote it.",
            "", f"Each artifact ran in a fresh process in its own runtime; {s['warmup']} warm-up runs discarded, "
            f"{s['runs']} timed runs at batch 1 with 1 thread and with {s['threads_all']} threads (p50 shown); "
            f"images/s from batches of {s['batch']} over the evaluation set (looped where the runtime takes batch 1 "
            f"only). Accuracy change and agreement are against the float PyTorch model on the same images.", ""]
    if d.get("class_error"):
        head += [f"**Data problem:** {d['class_error']}", ""]
    body = main_table(result["rows"]) + ["", "## Decision", ""] + decision_lines(result) + ratio_table(result)
    if result.get("runtime_ratios"):
        body += ["", "Each file above was timed in its own process, minutes apart from the others, so load from other "
                     "programs moves these ratios from run to run; `python -m benchmarks.ratios` times the same files "
                     "taking turns in one process, for ratios that hold still on a shared machine."]
    body += ["", "## Details", ""] + detail_table(result["rows"])
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    return "\n".join(head + body + ["", f"Libraries: {libs}.", ""])


def write_csv(rows: list[dict[str, Any]], dest: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow(["" if _get(r, f) is None else _get(r, f) for f in CSV_FIELDS])
    write_text(dest, buf.getvalue())


def plot(rows: list[dict[str, Any]], dest: Path) -> None:
    """Size against 1-thread latency, one labelled point per measured artifact with its accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("measured") and r.get("size_bytes") and p50(r)]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in pts:
        x, y = r["size_bytes"] / 1e6, p50(r)
        ax.scatter(x, y, s=60, marker="s" if "int8" in r["name"] else "o")
        acc = f"{r['accuracy']:.1f}%" if r.get("accuracy") is not None else "acc n/a"
        ax.annotate(f"{r['name']}\n{acc}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("latency p50, batch 1, 1 thread (ms)")
    ax.set_title("Artifact size vs latency (label: accuracy); squares = int8")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_md_and_json(out_dir: Path, stem: str, result: dict[str, Any], md: str) -> None:
    """A small command's report: <stem>.md and <stem>.json in out_dir, and a line saying where."""
    write_json(out_dir / f"{stem}.json", result)
    write_text(out_dir / f"{stem}.md", md)
    print(f"wrote {out_dir / (stem + '.md')} and {stem}.json")


def write_reports(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Summarize in place, then write the four files; returns their paths."""
    summarize(result, BASELINE)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json", "csv": out_dir / "report.csv",
             "png": out_dir / "report.png"}
    write_text(paths["md"], markdown(result))
    write_json(paths["json"], result)
    write_csv(result["rows"], paths["csv"])
    plot(result["rows"], paths["png"])
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return paths
