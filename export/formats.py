"""The format registry, and `export_all`: every format exports, proves itself, and becomes rows in the manifest.

FORMATS is data: name, the module and function that export it (imported by name, lazily, so a format
whose module or library is missing is a 'failed' row, not an import error for the whole toolkit), the
file suffix, the runtime that runs it (an export.runners name, or 'torchserve'), the manifest entries
it writes, and a description. Each exporter follows the toolkit signature
`export_<fmt>(ckpt, out_dir, *, eval_samples=None, calib_samples=None, **options) -> list[ArtifactEntry]`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from export.common import ExportError, failed_entry, tool_versions
from export.manifest import ArtifactEntry, read_manifest, record
from train.atomic import write_json
from train.checkpoint import Checkpoint
from train.cpu import cpu_description
from train.data import Sample, images_origin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    function: str
    suffix: str
    runtime: str
    entries: tuple[str, ...]
    description: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "export.onnx", "export_onnx", ".onnx", "onnxruntime",
           ("onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static"),
           "ONNX (opset 18, dynamic batch, one file) + ONNX Runtime int8 dynamic and static QDQ"),
    Format("coreml", "export.coreml", "export_coreml", ".mlpackage", "coreml",
           ("coreml_fp16", "coreml_w8", "coreml_palette6", "coreml_palette4"),
           "CoreML ML Program with image input and classifier: fp16, 8-bit, 6-bit and 4-bit palettized weights"),
    Format("executorch", "export.executorch", "export_executorch", ".pte", "executorch",
           ("executorch_fp32", "executorch_int8"), "ExecuTorch program lowered to XNNPACK: fp32 and PT2E int8"),
    Format("lite", "export.lite", "export_lite", ".ptl", "pytorch-lite", ("ptl_fp32", "ptl_int8"),
           "TorchScript Lite for the PyTorch Mobile lite interpreter: fp32 and int8 (qnnpack)"),
    Format("torchscript", "export.lite", "export_torchscript", ".torchscript.pt", "torchscript",
           ("torchscript_fp32",), "full TorchScript (torch.jit.save) for servers and benchmarks"),
    Format("mar", "export.mar", "export_mar", ".mar", "torchserve", ("torchserve_mar",),
           "TorchServe model archive with the toolkit's handler"),
)}


def _precision(entry_name: str) -> str:
    for tag in ("int8", "fp16", "w8", "palette6", "palette4"):
        if tag in entry_name:
            return tag
    return "fp32"


def _failed_rows(fmt: Format, ckpt: Checkpoint, out_dir: Path, before: dict[str, Any], error: str) -> list[ArtifactEntry]:
    """A 'failed' row for each entry of `fmt` that this attempt did not write itself."""
    now = read_manifest(out_dir)["artifacts"]
    rows = []
    for name in fmt.entries:
        if name in now and now[name] != before.get(name):
            rows.append(ArtifactEntry(**now[name]))  # written by the exporter before it failed
            continue
        row = failed_entry(ckpt, name=name, fmt=fmt.name, precision=_precision(name), runtime=fmt.runtime,
                           error=error)
        record(out_dir, row)
        rows.append(row)
    return rows


def export_format(name: str, ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                  calib_samples: list[Sample] | None = None, **options: Any) -> list[ArtifactEntry]:
    """One registered format; whatever goes wrong (missing module, missing library, a crash) becomes
    'failed' rows that say why, so the caller can go on with the next format."""
    fmt = FORMATS[name]
    out_dir = Path(out_dir)
    before = dict(read_manifest(out_dir)["artifacts"])
    try:
        function = getattr(importlib.import_module(fmt.module), fmt.function)
    except (ImportError, AttributeError) as err:
        return _failed_rows(fmt, ckpt, out_dir, before,
                            f"{fmt.module}.{fmt.function} is not available: {type(err).__name__}: {err}")
    try:
        return list(function(ckpt, out_dir, eval_samples=eval_samples, calib_samples=calib_samples, **options))
    except Exception as err:  # one format's failure must not stop the others
        log.exception("%s export failed", name)
        return _failed_rows(fmt, ckpt, out_dir, before, f"{type(err).__name__}: {err}")


def export_all(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
               calib_samples: list[Sample] | None = None, only: Sequence[str] | None = None,
               options: dict[str, dict[str, Any]] | None = None) -> list[ArtifactEntry]:
    """Export every registered format (or `only` those), in registry order; returns all rows written.
    `options` maps a format name to extra keyword arguments for its exporter."""
    names = list(FORMATS) if only is None else list(only)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format(s) {unknown}; registered formats are {list(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[ArtifactEntry] = []
    for name in names:
        log.info("exporting %s (%s)", name, FORMATS[name].description)
        rows += export_format(name, ckpt, out_dir, eval_samples=eval_samples, calib_samples=calib_samples,
                              **(options or {}).get(name, {}))
    write_json(out_dir / "export_config.json", {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, "formats": names,
        "options": options or {}, "eval_images": len(eval_samples) if eval_samples else "generated",
        "eval_images_origin": images_origin(eval_samples) if eval_samples else "generated",
        "calibration_images": len(calib_samples) if calib_samples else None,
        "machine": cpu_description(),
        "tool_versions": tool_versions(), "registry": [asdict(FORMATS[n]) for n in names],
        "results": {r.name: r.status for r in rows}})
    return rows
