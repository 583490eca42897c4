"""`export_all`: every registered format (export.registry) exports, proves itself in its runtime, and
becomes rows in artifacts.json; a format that fails is 'failed' rows with the reason, and the others go on."""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from export.common import record_failed, tool_versions
from export.manifest import ArtifactEntry, read_manifest, record_field
from export.registry import FORMATS, Format, get_format
from train.atomic import remove_partials, write_json
from train.checkpoint import Checkpoint
from train.cpu import cpu_description
from train.data import Sample, images_origin

log = logging.getLogger(__name__)


def _failed_rows(fmt: Format, ckpt: Checkpoint, out_dir: Path, before: dict[str, Any], error: str,
                 wanted: Sequence[str]) -> list[ArtifactEntry]:
    """A 'failed' row for each wanted entry of `fmt` that this attempt did not write itself."""
    now = read_manifest(out_dir)["artifacts"]
    rows = []
    for name in wanted:
        if name in now and now[name] != before.get(name):
            rows.append(ArtifactEntry(**now[name]))  # written by the exporter before it failed
        else:
            rows.append(record_failed(ckpt, out_dir, name, error))
    return rows


def export_format(name: str, ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                  calib_samples: list[Sample] | None = None, **options: Any) -> list[ArtifactEntry]:
    """One registered format; whatever goes wrong (missing module, missing library, a crash) becomes
    'failed' rows that say why, so the caller can go on with the next format."""
    fmt = get_format(name)
    out_dir = Path(out_dir)
    before = dict(read_manifest(out_dir)["artifacts"])
    try:
        function = getattr(importlib.import_module(fmt.module), fmt.function)
    except (ImportError, AttributeError) as err:
        return _failed_rows(fmt, ckpt, out_dir, before, f"{fmt.module}.{fmt.function} is not available: "
                            f"{type(err).__name__}: {err}", fmt.entries)
    try:
        return list(function(ckpt, out_dir, eval_samples=eval_samples, calib_samples=calib_samples, **options))
    except Exception as err:  # one format's failure must not stop the others
        log.exception("%s export failed", name)
        # every file of the format: those it wrote keep their rows, the rest fail (an earlier export's row of a
        # file this attempt never reached must not stay 'verified' beside a float file it was not made from)
        return _failed_rows(fmt, ckpt, out_dir, before, f"{type(err).__name__}: {err}", fmt.entries)


def format_options(names: Sequence[str], int8: str = "static", **shared: Any) -> dict[str, dict[str, Any]]:
    """Each format's exporter keywords: its registered `--int8` choice, plus those shared options (e.g.
    x86_isa) that the registry says it takes."""
    return {n: {**FORMATS[n].int8.get(int8, {}), **{k: v for k, v in shared.items() if k in FORMATS[n].options}}
            for n in names}


def timed_export(name: str, ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None,
                 calib_samples: list[Sample] | None, options: dict[str, Any]) -> tuple[list[ArtifactEntry], dict]:
    """export_format and the time it took: (rows, {'total': s, 'files': {entry: per-step seconds}})."""
    log.info("exporting %s (%s)", name, FORMATS[name].description)
    t0 = time.perf_counter()
    done = export_format(name, ckpt, out_dir, eval_samples=eval_samples, calib_samples=calib_samples, **options)
    return done, {"total": round(time.perf_counter() - t0, 2), "files": {r.name: r.details.get("timing_s") for r in done}}


def _remove_partials(out_dir: Path) -> None:
    gone = remove_partials(out_dir)
    if gone:
        log.warning("removed what a dead export worker left half-written: %s", ", ".join(gone))


def _crashed(ckpt: Checkpoint, out_dir: Path, name: str, reason: str) -> tuple[list[ArtifactEntry], dict]:
    return [record_failed(ckpt, out_dir, e, reason) for e in FORMATS[name].entries], {"total": 0.0, "files": {}}


def export_all(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
               calib_samples: list[Sample] | None = None, only: Sequence[str] | None = None,
               options: dict[str, dict[str, Any]] | None = None, jobs: int = 1) -> list[ArtifactEntry]:
    """Export every registered format (or `only` those); returns all rows written, in registry order.
    `options` maps a format name to extra keyword arguments for its exporter. `jobs` > 1 exports formats
    side by side in that many worker processes (export.parallel), each with its share of the cores; `jobs` 1
    exports them one after another in this process, or each in a fresh process where memory is tight."""
    names = list(FORMATS) if only is None else list(only)
    for n in names:
        get_format(n)  # an unknown name fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"ckpt": ckpt, "out_dir": out_dir, "eval_samples": eval_samples, "calib_samples": calib_samples}
    t0 = time.perf_counter()
    jobs = max(1, min(jobs, len(names)))
    from export.parallel import memory_tight, run_in_workers

    if jobs > 1 or memory_tight():
        per_format = run_in_workers(_format_job, names, jobs, {n: FORMATS[n].after for n in names},
                                    lambda n, why: _crashed(ckpt, out_dir, n, why),
                                    on_broken=lambda: _remove_partials(out_dir), options=options or {},
                                    one_per_process=jobs == 1, **common)
    else:
        per_format = {n: timed_export(n, options=(options or {}).get(n, {}), **common) for n in names}
    rows = [r for n in names for r in per_format[n][0]]
    timing = {n: per_format[n][1] for n in names}
    run = {"jobs": jobs, "wall_s": round(time.perf_counter() - t0, 2)}
    record_field(out_dir, "export_timing_s", timing)
    record_field(out_dir, "export_run", run)
    write_json(out_dir / "export_config.json", {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, "formats": names,
        "options": options or {}, "eval_images": len(eval_samples) if eval_samples else "generated",
        "eval_images_origin": images_origin(eval_samples) if eval_samples else "generated",
        "calibration_images": len(calib_samples) if calib_samples else None,
        "machine": cpu_description(),
        "tool_versions": tool_versions(), "registry": [asdict(FORMATS[n]) for n in names],
        "results": {r.name: r.status for r in rows}, "timing_s": timing, "run": run})
    return rows


def _format_job(name: str, *, options: dict[str, dict[str, Any]], **common: Any) -> tuple[list[ArtifactEntry], dict]:
    """One format in a worker process (module level, so a spawned worker can import it)."""
    return timed_export(name, options=options.get(name, {}), **common)


def _steps(times: dict[str, float] | None) -> str:
    if not times:
        return "-"
    quantize = f"{times['quantize']:.1f}+" if "quantize" in times else ""
    return f"{quantize}{times['convert_and_write']:.1f}/{times['verify']:.1f}"


def timing_table(timing: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """Where an export's time went: per format, and per file [quantize+] convert-and-write / verify (seconds;
    quantize, calibration included, for int8 recipes); a format's total also holds what its files share
    (imports, the reference logits, staging). With several jobs the formats overlap: the wall time is printed."""
    lines = [f"{'format':12s} {'total s':>8s}  files ([quantize incl. calibration +] convert+write / verify s)"]
    for fmt, t in timing.items():
        files = ", ".join(f"{n} {_steps(v)}" for n, v in t["files"].items())
        lines.append(f"{fmt:12s} {t['total']:8.1f}  {files}")
    lines.append(f"{'all':12s} {sum(t['total'] for t in timing.values()):8.1f}")
    if run:
        lines.append(f"{'wall':12s} {run['wall_s']:8.1f}  ({run['jobs']} job{'s' if run['jobs'] > 1 else ''})")
    return "\n".join(lines)


def source_record(ckpt: Checkpoint, data: Path | None, eval_samples: Sequence[Sample] | None) -> dict[str, Any]:
    """artifacts.json's source block: enough to rebuild the bundle or the benchmark without the command line."""
    from train.data import images_origin

    return {"checkpoint": str(Path(ckpt.path).resolve()), "checkpoint_sha256": ckpt.sha256, "arch": ckpt.arch,
            "spec": ckpt.spec.to_dict(), "data": str(Path(data).resolve()) if data else None,
            "eval_images_origin": images_origin(eval_samples) if eval_samples else "generated",
            "eval_images": [{"path": str(Path(s.path).resolve()), "label": int(s.label)} for s in eval_samples or []]}
