"""`python -m export.ort_mobile`: ONNX Runtime Mobile files for flutter_onnxruntime, verified in ONNX Runtime.

The dynamic-batch `.onnx` files suit servers, but ONNX Runtime's own mobile checker finds that phones'
accelerators can take little of them (NNAPI: 0 of 51 nodes of model.onnx) and all of a fixed batch-1 graph.
So this format writes, with onnxruntime's own tools:
- `model.ort` (ort_fp32) and `model_int8.ort` (ort_int8, static int8 QDQ calibrated on real train images,
  the same recipe as model_int8_static.onnx, its stem convolution kept whole for NNAPI): the batch fixed at
  1 (`make_dim_param_fixed`), converted to
  the ORT format (`convert_onnx_models_to_ort`, fixed optimizations for Arm), which both full ONNX Runtime
  packages (what flutter_onnxruntime ships) and reduced mobile builds load;
- `required_operators.config`: the operators those files need, for a reduced-size ORT build;
- in each manifest entry, the mobile checker's NNAPI and CoreML verdicts on the fixed-shape graph.
Each `.ort` is run in ONNX Runtime on the verification images: fp32 within FLOAT_ATOL of PyTorch, int8 with
its top-1 agreement recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from export import runners
from export.cli import add_common_args, add_x86_isa_arg, run_cli, variants_option
from export.common import (ExportError, calib_inputs, check_variants, eval_inputs, prove_in_runtime, record_failed,
                           reference_logits, require_calibration, write_proven)
from export.manifest import ArtifactEntry
from export.metadata import METADATA_KEY, embedded_metadata, from_json
from export.onnx import INPUT_NAME, OUTPUT_NAME, embed_metadata, write_onnx
from export.registry import variant
from train.atomic import atomic_path
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors

log = logging.getLogger(__name__)

# per precision: (the fixed-shape .onnx that flutter_onnxruntime loads, the ORT-format file for reduced builds)
VARIANTS = {"fp32": ("ort_mobile_fp32", "ort_fp32"), "int8": ("ort_mobile_int8", "ort_int8")}
CONFIG_FILE = "required_operators.config"
TARGET_PLATFORM = "arm"  # phones; also keeps x86-only layout rewrites (NCHWc) out of the file
ALTERNATIVES = "pass --variants fp32"


def fix_batch(src: Path, dst: Path, batch: int = 1) -> None:
    """The dynamic 'batch' dimension fixed to `batch`, output shapes inferred again (onnxruntime.tools)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(str(src))
    make_dim_param_fixed(model.graph, "batch", batch)
    fix_output_shapes(model)
    onnx.save(model, str(dst))


def _partitions(model: Any) -> dict[str, dict[str, Any]]:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    checks = {"nnapi": uc.check_nnapi_partitions,
              "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(
                  m, fixed, "coreml_supported_mlprogram_ops.md")}
    out = {}
    for ep, check in checks.items():
        info = check(model, True)
        out[ep] = {"supported_nodes": info.num_supported_nodes, "nodes": info.num_nodes,
                   "partitions": info.num_partitions, "should_perform_well": info.suitability().name,
                   "unsupported_ops": sorted(info.unsupported_ops)}
    return out


def mobile_usability(path: Path, optimize: bool = True) -> dict[str, dict[str, Any]]:
    """onnxruntime.tools.check_onnx_model_mobile_usability's NNAPI and CoreML (ML Program) partitioning as data:
    nodes the EP would take, partitions, and its verdict. `optimize`: after ORT's basic optimizations, as the
    checker does (False for a graph that is already what ONNX Runtime will run)."""
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory(prefix="ortcheck.") as tmp:
        if optimize:
            optimized = Path(tmp) / path.name
            optimize_model(path, optimized, use_external_initializers=True)
            path = optimized
        return _partitions(ModelProtoWithShapeInfo(path).model_with_shape_info)


def convert_to_ort(onnx_files: Sequence[Path], out_dir: Path) -> Path:
    """ORT-format files (same stem, `.ort`), the optimized ONNX equivalents (`.optimized.onnx`, what the
    `.ort` holds) and required_operators.config for all of them, in out_dir."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    src = out_dir / "src"
    src.mkdir(parents=True)
    for f in onnx_files:
        shutil.copy(f, src / f.name)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # the tool prints each step
            convert_onnx_models_to_ort(src, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=TARGET_PLATFORM, save_optimized_onnx_model=True)
    except Exception as err:
        raise ExportError(f"onnxruntime's ORT-format conversion failed: {err}\n{chatter.getvalue()[-2000:]}") from err
    return out_dir / CONFIG_FILE


def read_metadata(path: Path) -> dict[str, Any] | None:
    return from_json(_session(path).get_modelmeta().custom_metadata_map.get(METADATA_KEY))


def describe(path: Path) -> dict[str, Any]:
    """Inputs and outputs with their fixed shapes, as ONNX Runtime loads them."""
    s = _session(path)
    kind = "ORT (flatbuffer)" if path.suffix == ".ort" else "ONNX (protobuf), batch fixed for phone accelerators"
    return {"format": kind,
            "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in s.get_inputs()],
            "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in s.get_outputs()]}


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _stage(ckpt: Checkpoint, out_dir: Path, staging: Path, variants: Sequence[str], calib, x86_isa: str,
           ) -> tuple[dict[str, tuple[Path, dict[str, Any]]], Path]:
    """Every file of this format built in `staging`, with its details: {entry: (built file, details)}."""
    from quantize import onnx_rt

    dynamic = staging / "dynamic.onnx"
    reused = _reusable_float(ckpt, out_dir)
    if reused is not None:  # `python -m export` wrote and verified it moments ago from this checkpoint
        shutil.copy(reused, dynamic)
    else:
        write_onnx(ckpt.build_deploy_model(), ckpt.spec, dynamic)
    built: dict[str, tuple[Path, dict[str, Any]]] = {}
    for v in variants:
        mobile, ort_name = VARIANTS[v]
        src, details = dynamic, {"float_source": "model.onnx of this export" if reused else "exported here"}
        if v == "int8":
            src, q = _reusable_int8(ckpt, out_dir, calib[1], x86_isa) if reused else (None, None)
            if src is None:
                src = staging / "int8_dynamic_batch.onnx"
                q = onnx_rt.static_int8_onnx(dynamic, src, calib[0], x86_isa=x86_isa, threads=runners.DEFAULT_THREADS)
                q.pop("path", None)
            src, q = _phone_stem(src, staging, q)
            details["quantization"] = {**q, "calibration": calib[1]}
        for name in (mobile, ort_name):
            dst = staging / f"{Path(variant(name).file).stem}.onnx"
            fix_batch(src, dst)
            meta = embed_metadata(dst, embedded_metadata(ckpt, name))
            built[name] = (dst, {**details, "embedded_metadata": meta})
        built[mobile][1]["mobile_usability"] = mobile_usability(built[mobile][0])
    ort_names = [VARIANTS[v][1] for v in variants]
    config = convert_to_ort([built[n][0] for n in ort_names], staging / "ort")
    for name in ort_names:
        stem = Path(variant(name).file).stem
        # what ONNX Runtime will run: fused for its CPU kernels, which the phone accelerators do not take
        verdict = mobile_usability(staging / "ort" / f"{stem}.optimized.onnx", optimize=False)
        built[name] = (staging / "ort" / f"{stem}.ort", {**built[name][1], "mobile_usability": verdict})
    return built, config


def _phone_stem(src: Path, staging: Path, q: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The int8 graph with its stem convolution back in one piece: the static int8 recipe rewrites it as
    SpaceToDepth + a 4x4 convolution for CPU int8 kernels (quantize.stem), and ONNX Runtime's NNAPI provider
    takes no SpaceToDepth (the checker then said 150 of 151 nodes, 2 partitions, "MAYBE" instead of "YES")."""
    from quantize.stem import undo_space_to_depth_stem_onnx

    whole = staging / "int8_whole_stem.onnx"
    node = undo_space_to_depth_stem_onnx(src, whole)
    if node is None:
        return src, q
    return whole, {**q, "stem": None, "stem_undone": f"{node}: back to one 7x7 / 2 convolution for NNAPI, same "
                                                      f"int8 weights and ranges (quantize.stem)"}


def _reusable_float(ckpt: Checkpoint, out_dir: Path) -> Path | None:
    from export.onnx import read_metadata as onnx_metadata

    path = out_dir / variant("onnx_fp32").file
    try:
        meta = onnx_metadata(path) if path.is_file() else None
    except Exception:  # unreadable: export it again
        return None
    return path if meta and meta.get("source_checkpoint_sha256") == ckpt.sha256 else None


def _reusable_int8(ckpt: Checkpoint, out_dir: Path, calib_note: str,
                   x86_isa: str) -> tuple[Path | None, dict[str, Any] | None]:
    """This export's verified model_int8_static.onnx when it is the same recipe from the same checkpoint
    (MinMax on the same calibration images, the same x86 target, no node kept in float) and unaltered: its
    batch is fixed instead of calibrating again."""
    from export.manifest import entries, verify_file
    from quantize.torch_ao import resolve_x86_isa

    try:
        entry = next((e for e in entries(out_dir) if e.name == "onnx_int8_static" and e.status == "verified"), None)
    except Exception:  # no readable artifacts.json: quantize here
        return None, None
    q = dict((entry.details.get("quantization") or {}) if entry else {})
    if not entry or entry.source_checkpoint_sha256 != ckpt.sha256 or q.get("calibration") != calib_note \
            or q.get("calibration_method") != "MinMax" or q.get("nodes_excluded") \
            or q.get("x86_isa") != resolve_x86_isa(x86_isa, "onnxruntime"):
        return None, None
    try:
        path = verify_file(out_dir, entry)
    except Exception:  # missing or altered since: quantize here
        return None, None
    return path, {**q, "reused": f"{entry.path} of this export (same recipe and calibration images)"}


def export_ort(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
               calib_samples: list[Sample] | None = None, variants: Sequence[str] = tuple(VARIANTS),
               x86_isa: str = "auto", **_: Any) -> list[ArtifactEntry]:
    """Per precision, the batch-1 .onnx (ort_mobile_*) and .ort (ort_*), each run in ONNX Runtime."""
    check_variants(variants, VARIANTS)
    if "int8" in variants:
        require_calibration(calib_samples, "ORT Mobile int8", ALTERNATIVES)
    out_dir = Path(out_dir)
    inputs = eval_inputs(ckpt, eval_samples)
    ref = reference_logits(ckpt, inputs.x)
    calib = calib_inputs(ckpt, calib_samples) if "int8" in variants else None
    base = {"input": INPUT_NAME, "output": OUTPUT_NAME, "input_shape": [1, 3, ckpt.spec.input_size,
            ckpt.spec.input_size], "input_range": [0.0, 1.0], "normalization_in_graph": True, "batch": "fixed at 1",
            "spec": ckpt.spec.to_dict()}
    ort_format = {"optimization_style": "Fixed", "optimization_level": "all", "target_platform": TARGET_PLATFORM,
                  "reduced_build_config": CONFIG_FILE, "tool": "onnxruntime.tools.convert_onnx_models_to_ort"}
    names = [n for v in variants for n in VARIANTS[v]]
    with tempfile.TemporaryDirectory(prefix="ortmobile.") as tmp:
        try:
            staged, config = _stage(ckpt, out_dir, Path(tmp), variants, calib, x86_isa)
        except Exception as err:
            log.error("ORT Mobile staging failed: %s", err)
            return [record_failed(ckpt, out_dir, n, f"{type(err).__name__}: {err}", details=base) for n in names]
        with atomic_path(out_dir / CONFIG_FILE) as tmp_config:
            shutil.copy(config, tmp_config)
        rows = []
        for name in names:
            path, details = staged[name]
            extra = {"ort_format": ort_format} if path.suffix == ".ort" else {}
            rows.append(write_proven(ckpt, out_dir, name, details={**base, **details, **extra},
                                     write=lambda dst, path=path: shutil.copy(path, dst) and None,
                                     prove=prove_in_runtime(name, ref, inputs)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.ort_mobile", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_x86_isa_arg(p)
    p.add_argument("--variants", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_ort, argv,
                   lambda a: {"variants": variants_option(a.variants, VARIANTS), "x86_isa": a.x86_isa},
                   static_int8=lambda o: "int8" in o["variants"], alternatives=ALTERNATIVES)


if __name__ == "__main__":
    sys.exit(main())
