"""Build every variant the quantization report compares, each loaded in the runtime it ships in.

The report sits above the export stage (import-linter layers): the ONNX variants start from the float file
`export.onnx.write_onnx` writes, and every variant runs in the runner its artifact ships with.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.runners import EagerRunner, OnnxRunner, Runner
from quantize import torch_ao
from quantize.variants import static_from_array
from train.checkpoint import Checkpoint
from train.model import channels_last

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One model under test: how it runs, how big it is, and what quantization touched."""

    name: str
    precision: str
    runtime: str
    engine: str | None
    runner: Runner
    size_bytes: int
    settings: dict[str, Any] = field(default_factory=dict)
    touched: dict[str, Any] = field(default_factory=dict)
    time_engines: tuple[str, ...] = ()   # torch: other engines to time this model's TorchScript file under
    path: Path | None = None             # ONNX file, for a separate 1-thread latency session
    module: torch.nn.Module | None = None


def torch_size(module: torch.nn.Module) -> int:
    """Serialized bytes of the state dict (int8 modules serialize their packed int8 weights)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return len(buf.getvalue())


def torch_touched(model: torch.nn.Module) -> dict[str, Any]:
    """What quantization changed, read from the modules themselves."""
    q = torch_ao.quantized_modules(model)
    left = torch_ao.float_weighted_modules(model)
    kinds = Counter(v for v in q.values())
    text = (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing") + \
        (f"; {len(left)} conv/linear layer(s) left float" if left else "; no conv/linear left float")
    return {"quantized_modules": len(q), "by_type": dict(kinds), "quantized": sorted(q),
            "float_weighted_modules": left, "summary": "quantized: " + text}


def _torch_variant(name: str, model: torch.nn.Module, engine: str | None, settings: dict[str, Any],
                   threads: int | None, precision: str = "int8", time_engines: tuple[str, ...] = ()) -> Variant:
    runner = EagerRunner(threads=threads, engine=engine).use_module(model)
    return Variant(name, precision, "torch-eager", engine, runner, torch_size(model), settings,
                   torch_touched(model), time_engines, None, model)


def float_variant(ckpt: Checkpoint, threads: int | None) -> Variant:
    return _torch_variant("float", channels_last(ckpt.build_deploy_model()), None, {"precision": "fp32"}, threads, "fp32")


def torch_dynamic(ckpt: Checkpoint, engine: str, threads: int | None) -> Variant:
    from train.model import DeployModel

    torch_ao.set_engine(engine)
    model = DeployModel(torch_ao.dynamic_int8(ckpt.build_network()), ckpt.spec).eval()
    settings = {"mode": "torch dynamic (quantize_dynamic, nn.Linear, qint8 weights, activations "
                        "quantized at run time)", "engine": engine}
    return _torch_variant("torch_dynamic_int8", model, engine, settings, threads)


def torch_static(ckpt: Checkpoint, calib: np.ndarray, engine: str, threads: int | None, *,
                 keep_float: Sequence[str] = (), progress: bool = True,
                 suffix: str = "", reduce_range: str = "auto") -> Variant:
    model = static_from_array(ckpt, calib, engine, keep_float=keep_float, progress=progress,
                              reduce_range=reduce_range)
    settings = {"engine": engine, **torch_ao.qconfig_description(engine, reduce_range),
                "calibration_images": len(calib),
                "keep_float": list(keep_float)}
    others = tuple(e for e in ("x86", "qnnpack") if e != engine
                   and e in torch.backends.quantized.supported_engines)
    return _torch_variant(f"torch_static_int8_{engine}{suffix}", model, engine, settings, threads,
                          time_engines=others)


ONNX_KEEP = ("mode", "format", "weight_type", "activation_type", "activations", "per_channel", "reduce_range",
             "x86_isa", "nodes_excluded", "calibration_method", "calibration_images", "preprocessed", "opset",
             "onnxruntime_version")
ONNX_TOUCHED = ("integer_ops", "qdq_ops", "qdq_weight_ops", "float_weighted_ops", "quantized_node_count")


def _onnx_variant(name: str, path: Path, precision: str, info: dict[str, Any], threads: int | None) -> Variant:
    settings = {k: info[k] for k in ONNX_KEEP if k in info}
    touched = {k: info[k] for k in ONNX_TOUCHED if k in info}
    touched["summary"] = info.get("touched", "float graph: nothing quantized")
    return Variant(name, precision, "onnxruntime", "CPUExecutionProvider", OnnxRunner(threads=threads).load(path),
                   path.stat().st_size, settings, touched, (), path)


def onnx_static_fallback(base: Variant, calib: np.ndarray, keep_float: Sequence[str], threads: int | None,
                         progress: bool = True) -> Variant:
    """The ORT static variant again, with `keep_float` nodes left in float (same method and ISA target)."""
    from quantize.onnx_rt import static_int8_onnx

    src = base.path.with_name("model.onnx")
    dst = base.path.with_name("model_int8_static_fallback.onnx")
    info = static_int8_onnx(src, dst, calib, method=base.settings.get("calibration_method", "MinMax"),
                            per_channel=True, progress=progress, x86_isa=base.settings["x86_isa"],
                            nodes_to_exclude=keep_float)
    return _onnx_variant(base.name + "_fallback", dst, "int8", info, threads)


def onnx_variants(ckpt: Checkpoint, calib: np.ndarray, method: str, models_dir: Path,
                  threads: int | None, progress: bool = True, x86_isa: str = "auto") -> list[Variant]:
    """Float ONNX (the export stage's writer), then ORT dynamic and static QDQ int8 from it; the static
    one is made for the `x86_isa` target (7-bit weights for avx2, see quantize.onnx_rt)."""
    from export.onnx import write_onnx
    from quantize.onnx_rt import dynamic_int8_onnx, graph_summary, static_int8_onnx

    models_dir.mkdir(parents=True, exist_ok=True)
    fp32, dyn, sta = (models_dir / n for n in ("model.onnx", "model_int8_dynamic.onnx", "model_int8_static.onnx"))
    export_info = write_onnx(ckpt.build_deploy_model(), ckpt.spec, fp32)
    dyn_info = dynamic_int8_onnx(fp32, dyn)
    sta_info = static_int8_onnx(fp32, sta, calib, method=method, per_channel=True, progress=progress,
                                x86_isa=x86_isa)
    out = []
    for name, path, prec, info in (("onnx_fp32", fp32, "fp32", {**export_info, **graph_summary(fp32)}),
                                   ("onnx_int8_dynamic", dyn, "int8", dyn_info),
                                   ("onnx_int8_static", sta, "int8", sta_info)):
        out.append(_onnx_variant(name, path, prec, info, threads))
    return out


def evaluate(v: Variant, images: np.ndarray, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Logits of every image, in the variant's own runtime and engine."""
    from tqdm import tqdm

    if v.engine and v.runtime != "onnxruntime":
        torch_ao.set_engine(v.engine)
    outs = [v.runner.run(images[i:i + batch_size])
            for i in tqdm(range(0, len(images), batch_size), desc=f"evaluating {v.name}", unit="batch",
                          disable=not progress, leave=False)]
    return np.concatenate(outs).astype(np.float32)


def latency_fns(variants: Sequence[Variant], image: np.ndarray) -> dict[str, Any]:
    """Batch-1, one-thread callables. A torch int8 model is also timed as a TorchScript file loaded under
    each other engine (labelled `name@engine`), which is what a server or app that loads the file runs."""
    fns: dict[str, Any] = {}
    x = torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32))
    for v in variants:
        if v.path is not None:
            sess = OnnxRunner(threads=1).load(v.path)
            fns[v.name] = (lambda s=sess: s.run(image[None]))
            continue
        fns[v.name] = _torch_call(v.module, v.engine, x)
        for eng in v.time_engines:
            fns[f"{v.name}@{eng}"] = _torch_call(loaded_under(v.module, eng, x), eng, x)
    return fns


def loaded_under(module: torch.nn.Module, engine: str, example: torch.Tensor) -> torch.nn.Module:
    """`module` made TorchScript as `python -m export.lite` ships it, saved and loaded back with `engine` set. Loading
    re-packs int8 weights for the current engine's kernels; an in-memory model keeps its original packing."""
    from export.torchscript import script_or_trace  # time the same TorchScript the export ships

    previous = torch.backends.quantized.engine
    buf = io.BytesIO()
    torch.jit.save(script_or_trace(module, example)[0], buf)
    buf.seek(0)
    try:
        torch_ao.set_engine(engine)
        return torch.jit.load(buf)
    finally:
        torch.backends.quantized.engine = previous


def _torch_call(module: torch.nn.Module, engine: str | None, x: torch.Tensor):
    def call() -> None:
        torch.set_num_threads(1)
        if engine:
            torch.backends.quantized.engine = engine
        with torch.inference_mode():
            module(x)
    return call
