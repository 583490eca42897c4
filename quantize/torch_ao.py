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
REDUCE_RANGE_CHOICES = ("auto", "on", "off")


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
                only: Iterable[str] | None = None, reduce_range: str = "auto") -> nn.Module:
    """FX graph-mode post-training static int8 with conv-bn-relu fusion and per-channel weights.

    `calibration` yields *normalized* batches (what the network itself sees). `keep_float` names
    modules (e.g. 'layer1.0.conv1') left in float: the accuracy-aware fallback. `only`, if given,
    quantizes just those modules (everything else float): how per-layer sensitivity is measured.
    `reduce_range` ('auto', 'on', 'off') sets 7-bit activations; see `activation_reduce_range`.
    """
    set_engine(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        qmap = qconfig_mapping(engine, reduce_range)
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


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI / AVX-VNNI: int8 dot products accumulate in int32 instead of saturating int16."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


def activation_reduce_range(engine: str, choice: str = "auto") -> bool:
    """Whether activations are quantized to 7 bits (0..127) instead of 8.

    PyTorch's x86/fbgemm defaults use 7 bits because FBGEMM's AVX2 kernels sum pairs of u8*s8 products
    in int16, which can saturate. CPUs with VNNI accumulate in int32 and have no such limit, and the
    lost bit costs accuracy: on the reference model it is the difference between 5 and 4 flipped val
    images. 'auto' keeps 8 bits on a VNNI CPU and 7 bits on any other x86 one; 'on' forces 7 bits
    (quantize for a fleet of older x86 servers), 'off' forces 8. qnnpack and onednn never reduce.
    """
    if choice not in REDUCE_RANGE_CHOICES:
        raise QuantizationError(f"--reduce-range must be one of {REDUCE_RANGE_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return engine in ("x86", "fbgemm") and not cpu_has_vnni()


def qconfig_mapping(engine: str, reduce_range: str = "auto"):
    """The engine's default static qconfig mapping, with per-channel weights for every engine and the
    activation range from `activation_reduce_range`.

    PyTorch's default for 'qnnpack' is per-tensor weights; QNNPACK runs per-channel int8 convolutions
    too, and per-channel keeps accuracy within target, so phones get the same weight scheme as servers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization import (HistogramObserver, QConfig, default_per_channel_weight_observer,
                                           get_default_qconfig_mapping)

        activation = HistogramObserver.with_args(reduce_range=activation_reduce_range(engine, reduce_range))
        qmap = get_default_qconfig_mapping(engine)
        return qmap.set_global(QConfig(activation=activation, weight=default_per_channel_weight_observer))


def qconfig_description(engine: str, reduce_range: str = "auto") -> dict[str, str]:
    """The observers static int8 uses for `engine` (recorded in the report settings)."""
    reduced = activation_reduce_range(engine, reduce_range)
    why = {"on": "asked for with --reduce-range on", "off": "asked for with --reduce-range off"}.get(
        reduce_range, "this CPU lacks VNNI" if reduced else
        ("this CPU has VNNI, so 8 bits cannot saturate; pass --reduce-range on for x86 servers without VNNI"
         if engine in ("x86", "fbgemm") else f"the {engine} default"))
    return {"activation": f"HistogramObserver (per-tensor affine quint8, "
                          f"{'7-bit reduce_range' if reduced else 'full 8-bit range'}: {why})",
            "activation_reduce_range": str(reduced).lower(),
            "weight": "PerChannelMinMaxObserver (per-channel symmetric qint8)",
            "fusion": "conv-bn-relu (FX)", "mode": "FX graph mode post-training static"}
