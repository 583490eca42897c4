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
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(net).eval(), {nn.Linear}, dtype=torch.qint8)


def static_int8(net: nn.Module, calibration: Iterable[torch.Tensor], engine: str = "qnnpack",
                keep_float: Iterable[str] = (), example: torch.Tensor | None = None,
                only: Iterable[str] | None = None) -> nn.Module:
    """FX graph-mode post-training static int8 with conv-bn-relu fusion and per-channel weights.

    `calibration` yields *normalized* batches (what the network itself sees). `keep_float` names
    modules (e.g. 'layer1.0.conv1') left in float: the accuracy-aware fallback. `only`, if given,
    quantizes just those modules (everything else float): how per-layer sensitivity is measured.
    """
    set_engine(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        qmap = qconfig_mapping(engine)
        if only is not None:
            qconfig = qmap.global_qconfig
            qmap = qmap.set_global(None)
            for name in only:
                qmap = qmap.set_module_name(name, qconfig)
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


def quantizable_layers(net: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear modules static int8 quantizes (the layers sensitivity ranks)."""
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """{module name: class} for every int8 module in `model`: read from the model, not assumed."""
    out = {}
    for name, m in model.named_modules():
        mod = type(m).__module__
        if mod.startswith("torch.ao.nn.") and ".quantized" in mod and not name.endswith("_packed_params"):
            out[name] = f"{mod.split('.')[-3] if 'dynamic' in mod else 'static'}:{type(m).__name__}"
    return out


def float_weighted_modules(model: nn.Module) -> list[str]:
    """Conv/Linear modules (plain, or fused with BN/ReLU) still running in float after quantization."""
    found: list[str] = []
    for name, m in model.named_modules():
        mod = type(m).__module__
        if ".quantized" in mod or any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)) or mod.startswith("torch.ao.nn.intrinsic.modules"):
            found.append(name)
    return found


def qconfig_mapping(engine: str):
    """The engine's default static qconfig mapping, with per-channel weights for every engine.

    PyTorch's default for 'qnnpack' is per-tensor weights; QNNPACK runs per-channel int8 convolutions
    too, and per-channel keeps accuracy within target, so phones get the same weight scheme as servers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization import QConfig, default_per_channel_weight_observer, get_default_qconfig_mapping

        qmap = get_default_qconfig_mapping(engine)
        base = qmap.global_qconfig
        return qmap.set_global(QConfig(activation=base.activation, weight=default_per_channel_weight_observer))


def qconfig_description(engine: str) -> dict[str, str]:
    """The observers static int8 uses for `engine` (recorded in the report settings)."""
    qc = qconfig_mapping(engine).global_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        act, weight = repr(qc.activation()).split("(")[0], repr(qc.weight()).split("(")[0]
    return {"activation": act + str(getattr(qc.activation, "keywords", "")),
            "weight": weight + " (per-channel symmetric qint8)",
            "fusion": "conv-bn-relu (FX)", "mode": "FX graph mode post-training static"}
