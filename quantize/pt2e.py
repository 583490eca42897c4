"""PT2E int8 recipes (torchao's prepare_pt2e / convert_pt2e): for ExecuTorch's XNNPACK backend and for LiteRT.
They are quantization recipes, so they live with the others; export.executorch and export.litert lower what
they return."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

XNNPACK_INT8_SCHEME = {"quantizer": "executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer",
                       "config": "get_symmetric_quantization_config(is_per_channel=True)", "flow": "torchao PT2E",
                       "weights": "int8 symmetric per channel", "activations": "int8 static (calibrated)"}


def quantize_pt2e_xnnpack(model: nn.Module, example: tuple[torch.Tensor, ...], calib: np.ndarray,
                          batch_size: int = 16) -> nn.Module:
    """PT2E int8 for XNNPACK: observers from the XNNPACK quantizer (histogram observers for activations),
    calibrated in batches on a dynamic-batch graph (one image per call is several times slower); the
    caller exports the converted model again at batch 1."""
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


def quantize_pt2e_litert(model: nn.Module, example: tuple[torch.Tensor, ...],
                         calib: Iterable[np.ndarray]) -> tuple[nn.Module, Any]:
    """PT2E int8 for LiteRT (litert-torch's own PT2EQuantizer: int8 symmetric per-channel weights, int8
    static activations from histogram observers), calibrated one image at a time on the fixed-shape graph
    the .tflite keeps. Returns the converted graph and the quantizer, which the LiteRT converter needs too."""
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = quantize_pt2e.prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
        with torch.no_grad():
            for image in calib:
                graph(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)))
        return quantize_pt2e.convert_pt2e(graph, fold_quantize=False), quantizer


LITERT_INT8_SCHEME = {"quantizer": "litert_torch.quantize.pt2e_quantizer.PT2EQuantizer",
                      "config": "get_symmetric_quantization_config(is_per_channel=True)", "flow": "torchao PT2E",
                      "weights": "int8 symmetric per channel", "activations": "int8 static (calibrated)"}
