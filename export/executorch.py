"""`python -m export.executorch`: ExecuTorch programs (.pte) lowered to the XNNPACK backend.

The visible pipeline (as in ExecuTorch's examples/xnnpack/aot_compiler.py):
  fp32: torch.export.export(DeployModel) -> to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])
        -> to_executorch() -> model.pte
  int8: the stem convolution as space-to-depth + 4x4 convolution (quantize.stem) -> torch.export.export(...)
        .module() -> torchao prepare_pt2e(XNNPACKQuantizer, symmetric per-channel)
        -> calibrate on train-split images (batches of 16) -> convert_pt2e -> the same lowering -> model_int8.pte
Contract (both): input float32 (1, 3, H, W) RGB (gray repeated) in [0, 1], batch fixed at 1; output float32
(1, classes) logits in the checkpoint's class order. Normalization is inside the program.
Each .pte is loaded and run by the ExecuTorch runtime (its Python bindings, XNNPACK delegate) and compared
with the float PyTorch model: fp32 must match within FLOAT_ATOL, int8 reports agreement.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from export.cli import add_common_args, run_cli, variants_option
from export.common import ExportError  # noqa: F401  (what this module's checks raise, e.g. check_variants)
from export.common import (FLOAT_ATOL, calib_inputs, check_variants, eval_inputs, prove_in_runtime, quantize_step,
                           record_failed, reference_logits, require_calibration, write_proven)
from export.manifest import ArtifactEntry
from export.metadata import METADATA_KEY, embedded_metadata, from_json, to_json
from export.runners import ExecuTorchRunner
from quantize.pt2e import XNNPACK_INT8_SCHEME, quantize_pt2e_xnnpack
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors

log = logging.getLogger(__name__)

ALTERNATIVES = "pass --variants fp32"
VARIANTS = {"fp32": "executorch_fp32", "int8": "executorch_int8"}  # --variants value -> registry entry


def _example(spec: Any) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 3, spec.input_size, spec.input_size),)


def lower_to_pte(model: nn.Module, example: tuple[torch.Tensor, ...],
                 meta: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """torch.export -> edge dialect lowered to XNNPACK -> ExecuTorch program bytes, with what was delegated.
    `meta` goes in as a constant method (METADATA_KEY) returning the JSON as uint8: ExecuTorch programs have no
    metadata table, and constant methods are how ExecuTorch models carry configuration."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example)  # callers pass eval-mode (or converted PT2E) models
        constants = {METADATA_KEY: torch.frombuffer(bytearray(to_json(meta).encode()), dtype=torch.uint8)} if meta else None
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=constants)
        coverage = delegation_coverage(edge.exported_program().graph_module)
        return edge.to_executorch().buffer, coverage


def delegation_coverage(graph_module: Any) -> dict[str, Any]:
    """What runs inside the XNNPACK delegate and what falls back to portable kernels, by edge operator
    (ExecuTorch's devtools.backend_debug.get_delegation_info). Recorded in the manifest entry."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    graph = graph_module.graph
    calls = sum(1 for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    ops = {op: b for op, b in sorted(info.delegation_by_operator.items()) if op != "getitem"}  # tuple unpacking
    inside, outside = sum(b.delegated for b in ops.values()), sum(b.non_delegated for b in ops.values())
    return {"xnnpack_delegate_calls": calls, "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_ops_count": inside, "portable_ops_count": outside,
            "delegation_coverage": round(inside / (inside + outside), 4) if inside + outside else None,
            "ops_outside_delegate": sorted(op for op, b in ops.items() if b.non_delegated),
            "delegated_ops": {op: b.delegated for op, b in ops.items() if b.delegated}}


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata constant method of a .pte, run in the ExecuTorch runtime (None when the program has none)."""
    program = ExecuTorchRunner.bindings()._load_program(str(path))
    if METADATA_KEY not in method_names(program):
        return None
    return from_json(bytes(program.load_method(METADATA_KEY).call([])[0].numpy().tobytes()))


def method_names(program: Any) -> list[str]:
    """The methods a loaded program holds (`forward`, and the metadata constant method)."""
    return [program.get_method_name(i) for i in range(program.num_methods())]


def describe(path: Path) -> dict[str, Any]:
    return {"methods": sorted(method_names(ExecuTorchRunner.bindings()._load_program(str(path))))}


def _writer(model_fn, example: tuple[torch.Tensor, ...], meta: dict[str, Any], int8: bool = False):
    def write(tmp: Path) -> dict[str, Any]:
        model, step = quantize_step(model_fn) if int8 else (model_fn(), {})
        data, info = lower_to_pte(model, example, meta)
        tmp.write_bytes(data)
        return {**info, "embedded_metadata": read_metadata(tmp), **step}
    return write


def export_executorch(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                      calib_samples: list[Sample] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                      tolerance: float = FLOAT_ATOL, **_: Any) -> list[ArtifactEntry]:
    """model.pte (executorch_fp32) and model_int8.pte (executorch_int8), each run in the ExecuTorch runtime."""
    check_variants(variants, VARIANTS)
    if "int8" in variants:
        require_calibration(calib_samples, "ExecuTorch int8", ALTERNATIVES)
    out_dir = Path(out_dir)
    try:
        import executorch.exir  # noqa: F401  (the lowering needs it; the runtime is checked by the runner)
    except ImportError as err:
        return [record_failed(ckpt, out_dir, VARIANTS[v], f"executorch is not installed ({err}); pip install "
                              f"executorch") for v in variants]
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
        note = ("XNNPACK's float kernels reorder sums; the default FLOAT_ATOL holds in practice"
                if tolerance == FLOAT_ATOL else f"tolerance raised to {tolerance} by the caller")
        rows.append(write_proven(ckpt, out_dir, "executorch_fp32", details=base,
                                 write=_writer(ckpt.build_deploy_model, example,
                                               embedded_metadata(ckpt, "executorch_fp32")),
                                 prove=prove_in_runtime("executorch_fp32", ref, inputs, tol=tolerance, note=note)))
    if "int8" in variants:
        calib, calib_note = calib_inputs(ckpt, calib_samples)
        details = {**base, "quantization": {**XNNPACK_INT8_SCHEME, "calibration": calib_note}}
        rows.append(write_proven(ckpt, out_dir, "executorch_int8", details=details,
                                 write=_writer(lambda: quantize_pt2e_xnnpack(ckpt.build_deploy_model(), example,
                                                                             calib), example,
                                               embedded_metadata(ckpt, "executorch_int8"), int8=True),
                                 prove=prove_in_runtime("executorch_int8", ref, inputs)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.executorch", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--variants", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    p.add_argument("--tolerance", type=float, default=FLOAT_ATOL,
                   help=f"largest |logit difference| accepted for the fp32 program (default {FLOAT_ATOL})")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_executorch, argv,
                   lambda a: {"variants": variants_option(a.variants, VARIANTS), "tolerance": a.tolerance},
                   static_int8=lambda o: "int8" in o["variants"], alternatives=ALTERNATIVES)


if __name__ == "__main__":
    sys.exit(main())
