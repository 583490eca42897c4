"""The format registry: every fact about an export format that the rest of the toolkit needs, as data.

A format is one module (its exporter) plus one row here. Export, verification, the artifact manifest, the
benchmark, the Flutter bundle and the tests read names, files, precisions, runtimes, layouts and bundle
membership from this table and nowhere else. No heavy imports: the exporter module is imported by name only
when that format is exported (a missing library then fails that format, not the toolkit).

Each exporter follows one signature:
`export_<fmt>(ckpt, out_dir, *, eval_samples=None, calib_samples=None, **options) -> list[ArtifactEntry]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.errors import ToolkitError

BASE_TOOLS = ("torch", "torchvision", "numpy")
INT8_CHOICES = ("static", "dynamic", "none")


class RegistryError(ToolkitError, KeyError):
    """A format or artifact name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Variant:
    """One file a format writes, and one entry in artifacts.json.

    runtime: the export.runners name that runs it ('torchserve': served, checked through its handler);
    engine: the quantized engine, execution provider or delegate it is built for (an exporter option may
    change it); batch: 'dynamic' or a fixed size; calibrated: static int8, which needs real train images;
    bundle: the Flutter runtime package that loads it from the asset bundle (None: not bundled)."""

    name: str
    file: str
    precision: str
    runtime: str
    engine: str | None = None
    layout: str = "NCHW"
    batch: str = "dynamic"
    calibrated: bool = False
    bundle: str | None = None

    @property
    def is_int8(self) -> bool:
        return self.precision == "int8"


@dataclass(frozen=True)
class Format:
    """An export format: the exporter to call, what it writes, and the options it takes.

    options: extra keyword options `python -m export` passes through from its own flags (e.g. x86_isa);
    int8: for each `--int8` choice (static, dynamic, none), the exporter keywords that choose its int8 files."""

    name: str
    module: str
    function: str
    description: str
    variants: tuple[Variant, ...]
    tools: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    int8: dict[str, dict[str, Any]] = field(default_factory=dict)
    mobile: bool = True  # an on-device format (the benchmark recommends among these for apps)
    after: tuple[str, ...] = ()  # formats whose files this one reuses when they are exported in the same run

    @property
    def entries(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    def calibrates(self, int8: str) -> bool:
        """Whether `--int8 int8` makes this format write a file that needs real calibration images."""
        return int8 == "static" and any(v.calibrated for v in self.variants)


# Registry order is export order and bundle order: the first bundled file is the bundle's primary model.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "export.onnx", "export_onnx",
           "ONNX (opset 18, dynamic batch, one file) + ONNX Runtime int8 dynamic and static QDQ",
           (Variant("onnx_fp32", "model.onnx", "fp32", "onnxruntime", "CPUExecutionProvider"),
            Variant("onnx_int8_dynamic", "model_int8_dynamic.onnx", "int8", "onnxruntime", "CPUExecutionProvider"),
            Variant("onnx_int8_static", "model_int8_static.onnx", "int8", "onnxruntime", "CPUExecutionProvider",
                    calibrated=True)),
           tools=("onnx", "onnxruntime", "onnxscript"), options=("x86_isa",),
           int8={"static": {"int8": ("dynamic", "static")}, "dynamic": {"int8": ("dynamic",)}, "none": {"int8": ()}}),
    Format("coreml", "export.coreml", "export_coreml",
           "CoreML ML Program with image input and classifier: fp16, 8-bit, 6-bit and 4-bit palettized weights",
           (Variant("coreml_fp16", "model_fp16.mlpackage", "fp16", "coreml", "mlprogram", batch="1"),
            Variant("coreml_w8", "model_w8.mlpackage", "w8", "coreml", "mlprogram", batch="1"),
            Variant("coreml_palette6", "model_palette6.mlpackage", "palette6", "coreml", "mlprogram", batch="1"),
            Variant("coreml_palette4", "model_palette4.mlpackage", "palette4", "coreml", "mlprogram", batch="1")),
           tools=("coremltools",)),
    Format("lite", "export.torchscript", "export_lite",
           "TorchScript Lite for the PyTorch Mobile lite interpreter: fp32 and int8 (qnnpack)",
           (Variant("ptl_fp32", "model.ptl", "fp32", "pytorch-lite", bundle="pytorch_lite"),
            Variant("ptl_int8", "model_int8.ptl", "int8", "pytorch-lite", "qnnpack", calibrated=True,
                    bundle="pytorch_lite")),
           options=("x86_isa",),
           int8={"static": {"int8": "static"}, "dynamic": {"int8": "dynamic"}, "none": {"int8": "none"}}),
    Format("torchscript", "export.torchscript", "export_torchscript",
           "full TorchScript (torch.jit.save) for servers and benchmarks",
           (Variant("torchscript_fp32", "model.torchscript.pt", "fp32", "torchscript"),), mobile=False),
    Format("executorch", "export.executorch", "export_executorch",
           "ExecuTorch program lowered to XNNPACK: fp32 and PT2E int8",
           (Variant("executorch_fp32", "model.pte", "fp32", "executorch", "XnnpackBackend", batch="1",
                    bundle="executorch_flutter"),
            Variant("executorch_int8", "model_int8.pte", "int8", "executorch", "XnnpackBackend", batch="1",
                    calibrated=True, bundle="executorch_flutter")),
           tools=("executorch", "torchao"),
           int8={"static": {"variants": ("fp32", "int8")}, "dynamic": {"variants": ("fp32",)},
                 "none": {"variants": ("fp32",)}}),
    Format("litert", "export.litert", "export_litert",
           "LiteRT (.tflite) for tflite_flutter: fp32 and PT2E int8, NHWC input by default",
           (Variant("litert_fp32", "model.tflite", "fp32", "litert", "XNNPACK", layout="NHWC", batch="1",
                    bundle="tflite_flutter"),
            Variant("litert_int8", "model_int8.tflite", "int8", "litert", "XNNPACK", layout="NHWC", batch="1",
                    calibrated=True, bundle="tflite_flutter")),
           tools=("litert-torch", "ai-edge-litert", "torchao"),
           int8={"static": {"variants": ("fp32", "int8")}, "dynamic": {"variants": ("fp32",)},
                 "none": {"variants": ("fp32",)}}),
    Format("ort", "export.ort_mobile", "export_ort",
           "ONNX Runtime Mobile: batch-1 .onnx for flutter_onnxruntime (NNAPI/CoreML-ready) and .ort files for "
           "reduced builds with their operator config; fp32 and static int8",
           (Variant("ort_mobile_fp32", "model_mobile.onnx", "fp32", "onnxruntime", "CPUExecutionProvider",
                    batch="1", bundle="flutter_onnxruntime"),
            Variant("ort_fp32", "model.ort", "fp32", "onnxruntime", "CPUExecutionProvider", batch="1"),
            Variant("ort_mobile_int8", "model_int8_mobile.onnx", "int8", "onnxruntime", "CPUExecutionProvider",
                    batch="1", calibrated=True, bundle="flutter_onnxruntime"),
            Variant("ort_int8", "model_int8.ort", "int8", "onnxruntime", "CPUExecutionProvider", batch="1",
                    calibrated=True)),
           tools=("onnx", "onnxruntime"), options=("x86_isa",),
           int8={"static": {"variants": ("fp32", "int8")}, "dynamic": {"variants": ("fp32",)},
                 "none": {"variants": ("fp32",)}}, after=("onnx",)),
    Format("mar", "export.mar", "export_mar", "TorchServe model archive with the toolkit's handler",
           (Variant("torchserve_mar", "cxr_resnet18.mar", "fp32", "torchserve"),),
           tools=("torch-model-archiver", "torchserve"), mobile=False),
)}


def variants() -> dict[str, Variant]:
    """Every registered file, by entry name, in registry order."""
    return {v.name: v for f in FORMATS.values() for v in f.variants}


def variant(name: str) -> Variant:
    try:
        return variants()[name]
    except KeyError:
        raise RegistryError(f"unknown artifact {name!r}; registered: {', '.join(variants())}") from None


def format_of(name: str) -> Format:
    """The format that writes the entry `name`."""
    for f in FORMATS.values():
        if name in f.entries:
            return f
    raise RegistryError(f"unknown artifact {name!r}; registered: {', '.join(variants())}")


def get_format(name: str, flag: str = "--formats") -> Format:
    if name not in FORMATS:
        meant = _format_meant(name)
        hint = (f"did you mean {meant.name} (it writes {', '.join(v.file for v in meant.variants)})? "
                if meant else "")
        raise RegistryError(f"{flag} {name}: unknown format; {hint}choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def _format_meant(name: str) -> Format | None:
    """The format a user most likely meant by a file type, runtime or app package ('tflite', 'pte', 'torchserve',
    'ONNX'), named in the error rather than guessed silently."""
    key = name.strip().lower().lstrip(".")
    for f in FORMATS.values():
        if key == f.name or any(key in (v.file.rsplit(".", 1)[-1], v.runtime, v.bundle) for v in f.variants):
            return f
    return None


def bundle_variants(runtime: str | None = None) -> dict[str, Variant]:
    """The files the Flutter bundle may ship (for one app runtime package, or all), in registry order."""
    return {n: v for n, v in variants().items() if v.bundle and (runtime is None or v.bundle == runtime)}


def tools() -> tuple[str, ...]:
    """Every library whose version the manifest and the benchmark record."""
    out = list(BASE_TOOLS)
    for f in FORMATS.values():
        out += [t for t in f.tools if t not in out]
    return tuple(out)
