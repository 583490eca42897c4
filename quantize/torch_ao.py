"""The only module that touches `torch.ao.quantization` (PyTorch is moving this API to torchao).

Float network in, int8 network out. Quantization applies to the network only; the float preprocessing
stays in front of it (`train.model.DeployModel(quantized_net, spec)`), so every int8 artifact takes
the same [0, 1] input as the float one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from train.errors import ToolkitError

log = logging.getLogger(__name__)

STATIC_ENGINES = ("qnnpack", "x86", "fbgemm", "onednn")
REDUCE_RANGE_CHOICES = ("auto", "on", "off")  # older spelling of X86_ISA_CHOICES: on = avx2, off = vnni
X86_ISA_CHOICES = ("auto", "avx2", "vnni")
LEGACY_REDUCE_RANGE = {"on": "avx2", "off": "vnni"}
SATURATING_ENGINES = ("x86", "fbgemm", "onednn")  # u8 x s8 pairs summed in int16 without VNNI


class QuantizationError(ToolkitError, RuntimeError):
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


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run a block with `engine`'s int8 kernels, then give the process back the engine it had."""
    previous = torch.backends.quantized.engine
    set_engine(engine)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


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
    `reduce_range` is the x86 target ('auto', 'avx2', 'vnni'; older 'on'/'off'): see `weight_reduce_range`.
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
    """AVX-512 VNNI / AVX-VNNI / AMX: int8 dot products accumulate in int32 instead of saturating int16."""
    from train.cpu import has_vnni

    return has_vnni()


@functools.lru_cache(maxsize=None)
def int8_kernels_saturate(engine: str = "x86") -> bool:
    """Run one int8 convolution whose u8 x s8 pair sums exceed int16 with `engine`'s kernels, here.

    True on x86 CPUs without VNNI (FBGEMM and oneDNN sum pairs of products in int16 there), and when
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 / ONEDNN_MAX_CPU_ISA=AVX2 restrict a newer CPU to those kernels:
    the kernels are asked, not the CPU flags, so an emulated AVX2 machine behaves as a real one.
    """
    if engine not in torch.backends.quantized.supported_engines or engine == "qnnpack":
        return False
    from torch.ao.nn.quantized import Conv2d

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.quantize_per_tensor(torch.ones(1, 64, 8, 8), 1 / 255, 0, torch.quint8)  # u8 255
            w = torch.quantize_per_tensor(torch.ones(16, 64, 3, 3), 1 / 127, 0, torch.qint8)  # s8 127
            conv = Conv2d(64, 16, 3, padding=1)
            conv.set_weight_bias(w, None)
            conv.scale, conv.zero_point = 4.0, 0
            out = conv(x).dequantize()
        exact = torch.nn.functional.conv2d(x.dequantize(), w.dequantize(), padding=1)
        return bool((out - exact).abs().max() > 0.25 * exact.abs().max())
    finally:
        torch.backends.quantized.engine = previous


def resolve_x86_isa(choice: str = "auto", runtime: str = "torch") -> str:
    """'avx2' or 'vnni': the x86 CPUs an int8 server artifact must stay exact on.

    'avx2' makes int8 that cannot saturate on any x86-64 CPU (7-bit weights, in torch and ONNX Runtime),
    at a small cost in precision; 'vnni' keeps full 8 bits and is only safe on CPUs with VNNI or AMX.
    'auto' asks this machine: for torch, whether its int8 kernels saturate (so FBGEMM_ENABLE_INSTRUCTIONS /
    ONEDNN_MAX_CPU_ISA emulation counts); for ONNX Runtime, which ignores those variables, whether the CPU
    has VNNI. The older spellings 'on' / 'off' mean avx2 / vnni.
    """
    choice = LEGACY_REDUCE_RANGE.get(choice, choice)
    if choice not in X86_ISA_CHOICES:
        raise QuantizationError(f"--x86-isa must be one of {X86_ISA_CHOICES} (or --reduce-range "
                                f"{REDUCE_RANGE_CHOICES}), got {choice!r}")
    if choice != "auto":
        return choice
    from train.cpu import is_x86

    if runtime == "torch":
        return "avx2" if int8_kernels_saturate("x86") or int8_kernels_saturate("fbgemm") else "vnni"
    return "avx2" if is_x86() and not cpu_has_vnni() else "vnni"


def weight_reduce_range(engine: str, choice: str = "auto") -> bool:
    """Whether weights are quantized to 7 bits (scaled to -64..63; rounding reaches +64 at most) instead of 8,
    for x86 CPUs without VNNI.

    FBGEMM's and oneDNN's x86 kernels without VNNI sum pairs of u8 x s8 products in int16, which can
    saturate; with 7-bit weights it cannot (2 x 255 x 64 < 32768), on any x86-64 CPU. This is ONNX Runtime's
    remedy too (its `reduce_range`). It costs less than PyTorch's stock 7-bit activations: on the reference
    model the mean logit error is 0.039 against 0.043. CPUs with VNNI accumulate in int32 and keep 8 bits.
    `choice` is the x86 target (see resolve_x86_isa); qnnpack (phones) never reduces.
    """
    return engine in SATURATING_ENGINES and resolve_x86_isa(choice, "torch") == "avx2"


def qconfig_mapping(engine: str, reduce_range: str = "auto"):
    """The engine's default static qconfig mapping, with 8-bit histogram-observed activations, per-channel
    symmetric weights for every engine, and 7-bit weights for the avx2 target (`weight_reduce_range`).

    PyTorch's default for 'qnnpack' is per-tensor weights; QNNPACK runs per-channel int8 convolutions
    too, and per-channel keeps accuracy within target, so phones get the same weight scheme as servers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # observer / quantized-tensor deprecation chatter
        from torch.ao.quantization import (HistogramObserver, PerChannelMinMaxObserver, QConfig,
                                           default_per_channel_weight_observer, get_default_qconfig_mapping)

        weight = (PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                     quant_min=-64, quant_max=63)
                  if weight_reduce_range(engine, reduce_range) else default_per_channel_weight_observer)
        activation = HistogramObserver.with_args(reduce_range=False)
        qmap = get_default_qconfig_mapping(engine)
        return qmap.set_global(QConfig(activation=activation, weight=weight))


def qconfig_description(engine: str, reduce_range: str = "auto") -> dict[str, str]:
    """The observers static int8 uses for `engine` (recorded in the report settings and manifests)."""
    reduced = weight_reduce_range(engine, reduce_range)
    target = resolve_x86_isa(reduce_range, "torch")
    choice = LEGACY_REDUCE_RANGE.get(reduce_range, reduce_range)
    if engine not in SATURATING_ENGINES:
        why = f"the {engine} kernels do not saturate"
    elif choice != "auto":
        why = (f"x86 target {target} asked for (" + ("saturation-free on every x86-64 CPU" if reduced
                                                     else "exact only on CPUs with VNNI/AMX") + ")")
    elif reduced:
        why = "auto: this machine's int8 kernels saturate (no VNNI), so 7-bit weights keep them exact"
    else:
        why = "auto: this machine's int8 kernels do not saturate (VNNI); pass --x86-isa avx2 for servers without VNNI"
    return {"activation": "HistogramObserver (per-tensor affine quint8, full 8-bit range)",
            "weight": f"PerChannelMinMaxObserver (per-channel symmetric qint8, "
                      f"{'7-bit -64..63' if reduced else 'full 8-bit'}: {why})",
            "weight_reduce_range": str(reduced).lower(),
            "x86_isa": target if engine in SATURATING_ENGINES else "n/a",
            "fusion": "conv-bn-relu (FX)", "mode": "FX graph mode post-training static"}
