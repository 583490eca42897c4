"""`python -m export.executorch`: ExecuTorch programs (.pte) lowered to the XNNPACK backend.

The visible pipeline (as in ExecuTorch's examples/xnnpack/aot_compiler.py):
  fp32: torch.export.export(DeployModel) -> to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])
        -> to_executorch() -> model.pte
  int8: torch.export.export(...).module() -> torchao prepare_pt2e(XNNPACKQuantizer, symmetric per-channel)
        -> calibrate on train-split images (batches of 16) -> convert_pt2e -> the same lowering -> model_int8.pte
Contract (both): input float32 (1, 3, H, W) RGB (gray repeated) in [0, 1], batch fixed at 1; output float32
(1, classes) logits in the checkpoint's class order. Normalization is inside the program.
Each .pte is loaded and run by the ExecuTorch runtime (executorch.runtime, XNNPACK delegate) and compared
with the float PyTorch model: fp32 must match within FLOAT_ATOL, int8 reports agreement.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from export.common import (FLOAT_ATOL, ExportError, add_common_args, calib_inputs, eval_inputs, failed_entry,
                           float_proof, int8_proof, reference_logits, require_calibration, run_cli, write_proven)
from export.manifest import ArtifactEntry, record
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors

log = logging.getLogger(__name__)

DELEGATE = "XnnpackBackend"
ALTERNATIVES = "pass --variants fp32"

VARIANTS = {"fp32": ("executorch_fp32", "model.pte", "fp32"), "int8": ("executorch_int8", "model_int8.pte", "int8")}
INT8_SCHEME = {"quantizer": "executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer",
               "config": "get_symmetric_quantization_config(is_per_channel=True)", "flow": "torchao PT2E",
               "weights": "int8 symmetric per channel", "activations": "int8 static (calibrated)"}


def _example(spec: Any) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 3, spec.input_size, spec.input_size),)


def lower_to_pte(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[bytes, dict[str, Any]]:
    """torch.export -> edge dialect lowered to XNNPACK -> ExecuTorch program bytes, with what was delegated."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example)  # callers pass eval-mode (or converted PT2E) models
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program().graph
        delegated = sum(1 for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
        left = sorted({str(n.target) for n in graph.nodes if n.op == "call_function"
                       and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)})
        return edge.to_executorch().buffer, {"xnnpack_delegate_calls": delegated, "ops_outside_delegate": left}


def quantize_pt2e(model: nn.Module, example: tuple[torch.Tensor, ...], calib: np.ndarray,
                  batch_size: int = 16) -> nn.Module:
    """PT2E int8 for XNNPACK: observers from the XNNPACK quantizer (histogram observers for activations),
    calibrated in batches on a dynamic-batch graph (one image per call is several times slower); the
    converted model is exported again at batch 1 for the .pte."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    two = (example[0].expand(2, *example[0].shape[1:]).contiguous(),)
    chunks = np.array_split(calib, max(1, -(-len(calib) // batch_size)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.eval(), two, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for chunk in chunks:  # a batch of 1 would fall outside the exported batch range: repeat it
                chunk = np.concatenate([chunk, chunk]) if len(chunk) == 1 else chunk
                prepared(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)))
        return convert_pt2e(prepared)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from export.runners import get_runner

    return get_runner("executorch").load(path).run(x)


def _writer(model_fn, example: tuple[torch.Tensor, ...]):
    def write(tmp: Path) -> dict[str, Any]:
        data, info = lower_to_pte(model_fn(), example)
        tmp.write_bytes(data)
        return info
    return write


def export_executorch(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                      calib_samples: list[Sample] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                      tolerance: float = FLOAT_ATOL, **_: Any) -> list[ArtifactEntry]:
    """model.pte (executorch_fp32) and model_int8.pte (executorch_int8), each run in the ExecuTorch runtime."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ExportError(f"--variants {unknown}: choose from {list(VARIANTS)}")
    if "int8" in variants:
        require_calibration(calib_samples, "ExecuTorch int8", ALTERNATIVES)
    out_dir = Path(out_dir)
    try:
        import executorch.exir  # noqa: F401  (the lowering needs it; the runtime is checked by the runner)
    except ImportError as err:
        rows = [failed_entry(ckpt, name=VARIANTS[v][0], fmt="executorch", precision=VARIANTS[v][2],
                             runtime="executorch", error=f"executorch is not installed ({err}); pip install executorch")
                for v in variants]
        for row in rows:
            record(out_dir, row)
        return rows
    inputs = eval_inputs(ckpt, eval_samples)
    x = inputs.x
    ref = reference_logits(ckpt, x)
    example = _example(ckpt.spec)
    base = {"input_shape": list(ckpt.spec.input_shape), "input_range": [0.0, 1.0], "batch": "fixed at 1",
            "normalization_in_graph": True, "backend": "XNNPACK", "output": "logits (1, classes)",
            "pipeline": "torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch",
            "spec": ckpt.spec.to_dict()}
    rows = []
    if "fp32" in variants:
        note = ("XNNPACK's float kernels reorder sums; the default 1e-4 holds in practice"
                if tolerance == FLOAT_ATOL else f"tolerance raised to {tolerance} by the caller")
        rows.append(write_proven(ckpt, out_dir, name="executorch_fp32", file="model.pte", fmt="executorch",
                                 precision="fp32", runtime="executorch", engine=DELEGATE, details=base,
                                 write=_writer(ckpt.build_deploy_model, example),
                                 prove=lambda p: float_proof(_run(p, x), ref, "executorch", inputs, tolerance, note,
                                                             engine=DELEGATE)))
    if "int8" in variants:
        calib, calib_note = calib_inputs(ckpt, calib_samples)
        details = {**base, "quantization": {**INT8_SCHEME, "calibration": calib_note}}
        rows.append(write_proven(ckpt, out_dir, name="executorch_int8", file="model_int8.pte", fmt="executorch",
                                 precision="int8", runtime="executorch", engine=DELEGATE, details=details,
                                 write=_writer(lambda: quantize_pt2e(ckpt.build_deploy_model(), example, calib),
                                               example),
                                 prove=lambda p: int8_proof(_run(p, x), ref, "executorch", inputs, engine=DELEGATE)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.executorch", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--variants", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    p.add_argument("--tolerance", type=float, default=FLOAT_ATOL,
                   help=f"largest |logit difference| accepted for the fp32 program (default {FLOAT_ATOL})")
    return p


def _variants_option(value: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ExportError(f"--variants {value!r}: choose from {', '.join(VARIANTS)} (comma-separated)")
    return variants


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_executorch, argv,
                   lambda a: {"variants": _variants_option(a.variants), "tolerance": a.tolerance},
                   static_int8=lambda o: "int8" in o["variants"], alternatives=ALTERNATIVES)


if __name__ == "__main__":
    sys.exit(main())
