"""The only module that touches `torch.ao.quantization` (PyTorch is moving this API to torchao).

Float network in, int8 network out. Quantization applies to the network only; the float preprocessing
stays in front of it (`train.model.DeployModel(quantized_net, spec)`), so every int8 artifact takes
the same [0, 1] input as the float one.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

STATIC_ENGINES = ("qnnpack", "x86", "fbgemm", "onednn")


class QuantizationError(RuntimeError):
    """Quantization that cannot proceed as asked; the message says what to do."""


def check_engine(engine: str) -> None:
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise QuantizationError(f"--engine {engine!r} is not available in this torch build "
                                f"(available: {supported})")


def set_engine(engine: str) -> None:
    """Quantized kernels are chosen per process; set it before running or scripting an int8 model."""
    check_engine(engine)
    torch.backends.quantized.engine = engine


def dynamic_int8(net: nn.Module) -> nn.Module:
    """PyTorch dynamic int8: in ResNet-18 only the final Linear layer is quantized (convs stay float)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(net).eval(), {nn.Linear}, dtype=torch.qint8)


def static_int8(net: nn.Module, calibration: Iterable[torch.Tensor], engine: str = "qnnpack",
                keep_float: Iterable[str] = (), example: torch.Tensor | None = None) -> nn.Module:
    """FX graph-mode post-training static int8 with conv-bn-relu fusion and per-channel weights.

    `calibration` yields *normalized* batches (what the network itself sees). `keep_float` names
    modules (e.g. 'layer1.0.conv1') left in float: the accuracy-aware fallback.
    """
    set_engine(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        qmap = get_default_qconfig_mapping(engine)
        for name in keep_float:
            qmap = qmap.set_module_name(name, None)
        model = copy.deepcopy(net).eval()
        batches = iter(calibration)
        first = next(batches, None)
        if first is None:
            raise QuantizationError("no calibration images: pass a data folder with a train split")
        try:
            prepared = prepare_fx(model, qmap, example_inputs=(example if example is not None else first,))
        except Exception as err:
            raise QuantizationError(f"FX cannot trace this model ({type(err).__name__}: {err}); static "
                                    f"int8 needs a symbolically traceable network such as torchvision's "
                                    f"ResNet-18. Use --int8 dynamic instead.") from err
        with torch.inference_mode():
            prepared(first)
            for batch in batches:
                prepared(batch)
        return convert_fx(prepared)
