"""PT2E int8 recipes (torchao's prepare_pt2e / convert_pt2e): for ExecuTorch's XNNPACK backend and for LiteRT.
They are quantization recipes, so they live with the others; export.executorch and export.litert lower what
they return."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from quantize.stem import NOTE, space_to_depth_stem

XNNPACK_INT8_SCHEME = {"quantizer": "executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer",
                       "config": "get_symmetric_quantization_config(is_per_channel=True)", "flow": "torchao PT2E",
                       "weights": "int8 symmetric per channel", "activations": "int8 static (calibrated)",
                       "stem": NOTE}


def quantize_pt2e_xnnpack(model: nn.Module, example: tuple[torch.Tensor, ...], calib: np.ndarray,
                          batch_size: int = 16) -> nn.Module:
    """PT2E int8 for XNNPACK: the stem rewritten as space-to-depth + 4x4 convolution (quantize.stem), observers
    from the XNNPACK quantizer (histogram observers for activations), calibrated in batches on a dynamic-batch
    graph (one image per call is several times slower); the caller exports the converted model again at batch 1."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = space_to_depth_stem(model, example[0].shape[-1])
        prepared = prepare_pt2e(dynamic_batch_graph(model, example), quantizer)
        calibrate(prepared, calib, batch_size)
        return convert_pt2e(prepared)


def dynamic_batch_graph(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """torch.export of `model` with a dynamic batch dimension (exported at batch 2: torch.export specializes
    sizes 0 and 1), so calibration can run in batches whatever the model's forward signature."""
    two = example[0].expand(2, *example[0].shape[1:]).contiguous()
    shapes = torch.export.ShapesCollection()
    shapes[two] = {0: torch.export.Dim("batch")}
    return torch.export.export(model.eval(), (two,), dynamic_shapes=shapes).module()


def calibrate(prepared: nn.Module, calib: np.ndarray, batch_size: int) -> None:
    """Run the observers over `calib` in batches (a batch of 1 is repeated to stay in the exported range)."""
    with torch.no_grad():
        for chunk in np.array_split(calib, max(1, -(-len(calib) // batch_size))):
            chunk = np.concatenate([chunk, chunk]) if len(chunk) == 1 else chunk
            prepared(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)))


def quantize_pt2e_litert(model: nn.Module, example: tuple[torch.Tensor, ...], calib: np.ndarray,
                         batch_size: int = 16) -> tuple[nn.Module, Any]:
    """PT2E int8 for LiteRT (litert-torch's own PT2EQuantizer: int8 symmetric per-channel weights, int8
    static activations from histogram observers), calibrated in batches on a dynamic-batch graph; the
    LiteRT converter exports the converted graph again at the example's batch of 1. Returns the converted
    graph and the quantizer, which the converter needs too."""
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import quantize_pt2e

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(config)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its annotators print per partition
        warnings.simplefilter("ignore")
        graph = dynamic_batch_graph(model, example)
        annotate_residual_adds(graph, config)
        annotate_constant_pads(graph)
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
        calibrate(graph, calib, batch_size)
        converted = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    # Exported from model.eval(), so the graph already has eval semantics, but a GraphModule keeps its training
    # flag and refuses .eval(); litert-torch warns "converted in training mode" on the flag alone.
    converted.training = False
    return converted, quantizer


ADD_OPS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
RELU_OPS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def annotate_residual_adds(graph: torch.fx.GraphModule, config: Any) -> int:
    """int8 annotations for the residual adds (and the ReLU after each), as litert-torch's own 'add_relu'
    and 'add' annotators would write them. Those find adds through `source_fn_stack` metadata, which
    torch.export no longer records: every residual add stayed float (8 float ADDs, each between DEQUANTIZE
    and QUANTIZE ops, in the .tflite). Returns how many adds it annotated."""
    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec, get_output_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    count = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in ADD_OPS or "quantization_annotation" in node.meta:
            continue
        inputs = {a: get_input_act_qspec(config) for a in node.args[:2] if isinstance(a, torch.fx.Node)}
        users = list(node.users)
        relu = users[0] if len(users) == 1 and users[0].target in RELU_OPS else None
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs, output_qspec=None if relu else get_output_act_qspec(config), _annotated=True)
        if relu is not None:
            relu.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                                          _annotated=True)
        count += 1
    return count


PAD_OPS = (torch.ops.aten.constant_pad_nd.default, torch.ops.aten.pad.default)


def annotate_constant_pads(graph: torch.fx.GraphModule) -> int:
    """Constant pads after a ReLU (the stem max-pool's zero pad) share the ReLU's int8 parameters (a pad only
    copies values), as litert-torch annotates max-pool. Left unannotated, such a pad gets parameters of its own
    and the .tflite gains a requantize after it. Other pads are left to the quantizer: sharing with an input it
    does not annotate (the space-to-depth stem's reshapes, quantize.stem) fails in prepare_pt2e.
    Returns how many pads it annotated."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    count = 0
    for node in graph.graph.nodes:
        if (node.op != "call_function" or node.target not in PAD_OPS or "quantization_annotation" in node.meta
                or getattr(node.args[0], "target", None) not in RELU_OPS):
            continue
        shared = SharedQuantizationSpec(node.args[0])
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: shared}, output_qspec=shared, _annotated=True)
        count += 1
    return count


LITERT_INT8_SCHEME = {"quantizer": "litert_torch.quantize.pt2e_quantizer.PT2EQuantizer",
                      "config": "get_symmetric_quantization_config(is_per_channel=True)", "flow": "torchao PT2E",
                      "weights": "int8 symmetric per channel", "activations": "int8 static (calibrated)",
                      "stem": NOTE}
