"""`python -m export.onnx`: one self-contained ONNX file, normalization inside, verified in ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.atomic import atomic_path
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
        onnx.checker.check_model(proto, full_check=True)
    return {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, "exporter": "torch.onnx dynamo",
            "onnx_version": onnx.__version__}
