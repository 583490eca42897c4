"""`python -m export.onnx`: one self-contained ONNX file, normalization inside, verified in ONNX Runtime.

Contract: input 'image' float32 (batch, 3, H, W), RGB (gray repeated) in [0, 1], batch dimension dynamic;
output 'logits' float32 (batch, classes) in the checkpoint's class order (softmax for probabilities).
model.onnx must reproduce the PyTorch logits within FLOAT_ATOL in ONNX Runtime; the int8 files
(ONNX Runtime dynamic, and static QDQ calibrated on the train split) come from quantize.onnx_rt and
are verified by running them, with top-1 agreement and the largest probability change recorded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from export import runners
from export.cli import add_common_args, add_x86_isa_arg, run_cli
from export.common import (FLOAT_ATOL, ExportError, InputSet, calib_inputs, eval_inputs, prove_in_runtime,
                           quantize_step, record_failed, reference_logits, require_calibration, run_artifact,
                           write_proven)
from export.manifest import ArtifactEntry
from export.metadata import METADATA_KEY, embedded_metadata, from_json, to_json
from export.registry import variant
from quantize.torch_ao import resolve_x86_isa
from train.atomic import atomic_path
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors
from train.spec import PreprocessSpec

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"    # float32 (batch, 3, H, W) RGB in [0, 1]
OUTPUT_NAME = "logits"  # float32 (batch, classes), in the checkpoint's class order


def write_onnx(model: nn.Module, spec: PreprocessSpec, dest: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Export `model` (a DeployModel: [0,1] in, logits out) with the torch.export-based exporter, a
    dynamic batch dimension and no external-data side file (Flutter plugins load models from bytes)."""
    import onnx

    example = (torch.rand(2, 3, spec.input_size, spec.input_size),)
    program = torch.onnx.export(
        model.eval(), example, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, opset_version=opset,
        external_data=False,
    )
    with atomic_path(dest) as tmp:
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:  # torch's exporter falls back to what it wrote, with a warning lost in its log
            raise ExportError(f"--opset {opset}: torch {torch.__version__} wrote opset {written} and could not "
                              f"convert this model to {opset}; pass --opset {written} or higher, or convert "
                              f"model.onnx yourself with onnx.version_converter and check it in your runtime")
        onnx.checker.check_model(proto, full_check=True)
    return {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, "exporter": "torch.onnx dynamo",
            "onnx_version": onnx.__version__}


INT8_MODES = ("dynamic", "static")
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeLinear")


def embed_metadata(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The toolkit's metadata into the model's metadata_props (kept beside any the exporter wrote)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({METADATA_KEY: to_json(meta), "classes": ",".join(meta["classes"])})
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return meta


def read_metadata(path: Path) -> dict[str, Any] | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return from_json({p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY))


def describe(path: Path) -> dict[str, Any]:
    """Opset, node count, operators and how many of them are quantized ones."""
    from collections import Counter

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    return {"opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import}, "nodes": sum(ops.values()),
            "operators": dict(sorted(ops.items())), "quantized_ops": sum(ops[k] for k in QUANTIZED_OPS),
            "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output]}


def _prove_fp32(ref: np.ndarray, inputs: InputSet):
    """Logits within FLOAT_ATOL on the whole batch, and a batch of 1 gives the same (dynamic batch)."""
    x = inputs.x
    prove_batch = prove_in_runtime("onnx_fp32", ref, inputs)

    def prove(path: Path) -> dict[str, Any]:
        verification = prove_batch(path)
        single = run_artifact("onnx_fp32", path, x[:1])
        if not np.abs(single - ref[:1]).max() <= FLOAT_ATOL:
            raise ExportError(f"{path.name}: batch 1 gives different logits than batch {len(x)} "
                              f"(dynamic batch dimension broken)")
        return {**verification, "batch_sizes_run": sorted({1, len(x)})}
    return prove


def _int8_writer(mode: str, src: Path, calib: tuple[np.ndarray, str] | None, method: str, x86_isa: str,
                 meta: dict[str, Any]):
    """Calls the quantization stage's ORT functions (quantize.onnx_rt) on the verified float file."""
    def write(tmp: Path) -> dict[str, Any]:
        from quantize import onnx_rt

        if mode == "dynamic":
            info, step = quantize_step(lambda: onnx_rt.dynamic_int8_onnx(src, tmp))
        else:
            info, step = quantize_step(lambda: onnx_rt.static_int8_onnx(
                src, tmp, calib[0], method=method, x86_isa=x86_isa,
                threads=runners.DEFAULT_THREADS))  # this worker's share of the cores
            info["calibration"] = calib[1]
        info.pop("path", None)  # the temporary name; the entry records the final one
        return {"quantization": info, "input": INPUT_NAME, "output": OUTPUT_NAME,
                "embedded_metadata": embed_metadata(tmp, meta), **step}
    return write


def export_onnx(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                calib_samples: list[Sample] | None = None, opset: int = OPSET,
                int8: Sequence[str] = INT8_MODES, calib_method: str = "MinMax", x86_isa: str = "auto",
                **_: Any) -> list[ArtifactEntry]:
    """model.onnx (onnx_fp32, logits within FLOAT_ATOL in ONNX Runtime), then the int8 variants made by
    the quantization stage from that file, each verified in ONNX Runtime against the float model.
    Static int8 needs `calib_samples` (real train-split images) and is made for the `x86_isa` target."""
    unknown = sorted(set(int8) - set(INT8_MODES))
    if unknown:
        raise ExportError(f"--int8 {unknown}: choose from {INT8_MODES} (or none)")
    if "static" in int8:
        require_calibration(calib_samples, "ONNX static int8", "pass --int8 dynamic or --int8 none")
        resolve_x86_isa(x86_isa, "onnxruntime")  # a bad value fails before anything is written
    out_dir = Path(out_dir)
    inputs = eval_inputs(ckpt, eval_samples)
    x = inputs.x
    ref = reference_logits(ckpt, x)
    base = {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, "input_shape": ["batch", 3,
            ckpt.spec.input_size, ckpt.spec.input_size], "input_range": [0.0, 1.0],
            "normalization_in_graph": True, "external_data": False, "spec": ckpt.spec.to_dict()}
    rows = [write_proven(ckpt, out_dir, "onnx_fp32", details=base,
                         write=lambda tmp: {**write_onnx(ckpt.build_deploy_model(), ckpt.spec, tmp, opset),
                                            "embedded_metadata": embed_metadata(tmp, embedded_metadata(ckpt, "onnx_fp32"))},
                         prove=_prove_fp32(ref, inputs))]
    src = out_dir / variant("onnx_fp32").file
    calib = calib_inputs(ckpt, calib_samples) if "static" in int8 and rows[0].status != "failed" else None
    for mode in INT8_MODES:
        if mode not in int8:
            continue
        name = f"onnx_int8_{mode}"
        details = {**base, "int8_mode": mode, "calibration_method": calib_method if mode == "static" else None}
        if rows[0].status == "failed":  # an int8 file from an earlier run must not outlive its source
            rows.append(record_failed(ckpt, out_dir, name, "not attempted: the float model.onnx (onnx_fp32) failed",
                                      details=details))
            continue
        rows.append(write_proven(ckpt, out_dir, name, details=details,
                                 write=_int8_writer(mode, src, calib, calib_method, x86_isa,
                                                    embedded_metadata(ckpt, name)),
                                 prove=prove_in_runtime(name, ref, inputs)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_x86_isa_arg(p)
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--int8", default="dynamic,static",
                   help="comma-separated int8 variants from ONNX Runtime's quantizer: dynamic, static, "
                        "or 'none' (default dynamic,static)")
    p.add_argument("--calib-method", default="MinMax", choices=("MinMax", "Entropy", "Percentile"),
                   help="static int8 calibration method (default MinMax)")
    return p


def _int8_option(value: str) -> tuple[str, ...]:
    modes = () if value.strip() == "none" else tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(set(modes) - set(INT8_MODES))
    if unknown:
        raise ExportError(f"--int8 {','.join(unknown)}: choose from {', '.join(INT8_MODES)} (comma-separated) or none")
    return modes


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_onnx, argv,
                   lambda a: {"opset": a.opset, "int8": _int8_option(a.int8), "calib_method": a.calib_method,
                              "x86_isa": a.x86_isa},
                   static_int8=lambda o: "static" in o["int8"], alternatives="pass --int8 dynamic or --int8 none")


if __name__ == "__main__":
    sys.exit(main())
