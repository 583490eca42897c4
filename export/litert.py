"""`python -m export.litert`: LiteRT (.tflite, the TensorFlow Lite runtime) for tflite_flutter apps.

The visible pipeline (Google's litert-torch converter):
  fp32: DeployModel -> (NHWC: NhwcDeployModel) -> litert_torch.convert -> model.tflite
  int8: the same graph, its stem convolution as space-to-depth + 4x4 convolution (quantize.stem) -> torch.export
        -> PT2E with litert-torch's PT2EQuantizer (quantize.pt2e: int8
        per-channel weights, int8 activations calibrated on train-split images) -> litert_torch.convert -> model_int8.tflite
Contract: input float32 (1, H, W, 3) NHWC by default (what tflite_flutter apps build from image bytes; --layout nchw
gives (1, 3, H, W)), RGB (gray repeated) in [0, 1]; normalization is inside the graph. Output (1, classes) logits:
float32 for model.tflite; int8 for model_int8.tflite (logits = scale * (q - zero_point), both recorded in the
manifest; the top class needs no dequantizing). Each file is run in LiteRT's own interpreter (ai-edge-litert, default
XNNPACK delegate) and compared with the float PyTorch model; the manifest counts the int8 file's quantized ops and
records what the XNNPACK delegate takes (partitions, ops left outside). The stem max-pool is zero-padded so that no
PADV2 splits the graph (zero_padded_maxpool).
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
from export.common import (ExportError, calib_inputs, check_variants, eval_inputs, prove_in_runtime, quantize_step,
                           record_failed, reference_logits, require_calibration, write_proven)
from export.manifest import ArtifactEntry
from export.metadata import METADATA_KEY, embedded_metadata, from_json, to_json
from quantize.stem import space_to_depth_nhwc, space_to_depth_stem
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors
from train.model import DeployModel, stretch_contrast

log = logging.getLogger(__name__)

LAYOUTS = ("nhwc", "nchw")
VARIANTS = {"fp32": "litert_fp32", "int8": "litert_int8"}  # --variants value -> registry entry
ALTERNATIVES = "pass --variants fp32"


class NhwcDeployModel(nn.Module):
    """The deploy model taking (N, H, W, 3) images, as tflite_flutter apps build them, and normalizing them in
    that layout: each row of W x 3 values minus a row-long mean over a row-long std (the spec's mean and std
    repeated W times), then one transpose into the network. Why rows: normalizing with the 3-value mean and std,
    broadcast over NHWC, makes XNNPACK call its subtract and multiply kernels once per pixel, 50,176 calls of 3
    values each, 0.5 ms of a float inference and 5% of an int8 one on a 2-core EPYC; rows take 224 calls."""

    def __init__(self, deploy: DeployModel, width: int) -> None:
        super().__init__()
        pre = deploy.preprocess
        self.net = deploy.net
        self.contrast_stretch = pre.contrast_stretch
        self.register_buffer("mean_row", pre.mean.reshape(-1).repeat(width))
        self.register_buffer("std_row", pre.std.reshape(-1).repeat(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.contrast_stretch:
            x = stretch_contrast(x)
        n, h, w, c = x.shape
        x = ((x.reshape(n, h, w * c) - self.mean_row) / self.std_row).reshape(n, h, w, c)
        if getattr(self.net.conv1, "input_moved", False):  # the int8 stem (quantize.stem) takes it rearranged
            x = space_to_depth_nhwc(x)
        return self.net(x.permute(0, 3, 1, 2))


def layout_model(model: DeployModel, layout: str, width: int) -> nn.Module:
    """The model with the input layout the app feeds (`width`: the input's width in pixels)."""
    return (model if layout == "nchw" else NhwcDeployModel(model, width)).eval()


def zero_padded_maxpool(model: nn.Module) -> nn.Module:
    """The model with ResNet's stem max-pool padded with zeros instead of -inf. litert-torch writes -inf padding
    as PADV2, which XNNPACK does not take: LiteRT then splits the graph into two delegate partitions with a CPU
    op between (and GPU/NNAPI delegates would do the same). The pool follows a ReLU, so its input is >= 0 and
    zero padding gives exactly the same output."""
    import torchvision

    net = getattr(model, "net", None)
    pool = getattr(net, "maxpool", None)
    if not isinstance(net, torchvision.models.ResNet) or not isinstance(pool, nn.MaxPool2d) or not pool.padding:
        return model
    pad = pool.padding if isinstance(pool.padding, int) else pool.padding[0]
    net.maxpool = nn.Sequential(nn.ZeroPad2d(pad), nn.MaxPool2d(pool.kernel_size, pool.stride, 0, pool.dilation,
                                                                ceil_mode=pool.ceil_mode))
    return model


def deploy_model(ckpt: Checkpoint, layout: str, int8_stem: bool = False) -> nn.Module:
    """The float model LiteRT converts: the deploy model, delegate-friendly, in the app's input layout; with
    `int8_stem`, its stem rewritten for int8 kernels (quantize.stem)."""
    model = zero_padded_maxpool(ckpt.build_deploy_model())
    if int8_stem:
        space_to_depth_stem(model, ckpt.spec.input_size, input_moved=layout == "nhwc")
    return layout_model(model, layout, ckpt.spec.input_size)


def example_input(spec: Any, layout: str) -> tuple[torch.Tensor, ...]:
    size = spec.input_size
    return (torch.zeros(1, size, size, 3) if layout == "nhwc" else torch.zeros(1, 3, size, size),)


def convert(model: nn.Module, example: tuple[torch.Tensor, ...], dest: Path, quantizer: Any = None) -> None:
    """litert_torch.convert, then the flatbuffer written to `dest`."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    config = QuantConfig(pt2e_quantizer=quantizer) if quantizer is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litert_torch.convert(model, example, quant_config=config).export(str(dest))


def op_summary(path: Path) -> dict[str, Any]:
    """Operators of the .tflite with their input dtypes, read without delegates (so none hide in a DELEGATE
    node), how many conv/fully-connected ops really run in int8, and the float adds and DEQUANTIZE ops left
    between them: a recipe that silently leaves layers in float shows up here."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    dtypes = {t["index"]: t["dtype"].__name__ for t in it.get_tensor_details()}
    ops: dict[str, int] = {}
    for op in it._get_ops_details():
        key = f"{op['op_name']}({','.join(sorted({dtypes[i] for i in op['inputs'] if i >= 0}))})"
        ops[key] = ops.get(key, 0) + 1
    compute = {k: n for k, n in ops.items() if k.startswith(("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))}
    out = it.get_output_details()[0]
    return {"operators": ops, "compute_ops": sum(compute.values()),
            "compute_ops_int8": sum(n for k, n in compute.items() if "int8" in k),
            "float_adds": sum(n for k, n in ops.items() if k.startswith("ADD(") and "float32" in k),
            "dequantize_ops": sum(n for k, n in ops.items() if k.startswith("DEQUANTIZE(")),
            "input": {"shape": it.get_input_details()[0]["shape"].tolist(),
                      "dtype": it.get_input_details()[0]["dtype"].__name__},
            "output": {"dtype": out["dtype"].__name__, "scale": float(out["quantization"][0]),
                       "zero_point": int(out["quantization"][1])}}


def xnnpack_delegation(path: Path) -> dict[str, Any]:
    """What LiteRT's default XNNPACK delegate (the one tflite_flutter apps get) takes from the file: its partitions,
    and the ops left to LiteRT's own kernels. Each delegate node's subgraph is found by walking back from its
    outputs to its inputs; an op on no such walk runs outside the delegate."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    nodes = it._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n for n in ops for t in n["outputs"]}
    inside: set[int] = set()
    for node in delegates:
        boundary, todo = {int(t) for t in node["inputs"]}, [int(t) for t in node["outputs"]]
        while todo:
            t = todo.pop()
            op = producer.get(t)
            if t in boundary or op is None or op["index"] in inside:
                continue
            inside.add(op["index"])
            todo += [int(i) for i in op["inputs"] if i >= 0]
    outside: dict[str, int] = {}
    for op in ops:
        if op["index"] not in inside:
            outside[op["op_name"]] = outside.get(op["op_name"], 0) + 1
    return {"delegate": "XNNPACK (LiteRT default)", "partitions": len(delegates), "ops": len(ops),
            "delegated_ops": len(inside), "delegation_coverage": round(len(inside) / len(ops), 4) if ops else None,
            "ops_outside_delegate": outside}


def embed_metadata(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The toolkit's metadata as a named entry of the flatbuffer's `metadata` table (the place TFLite keeps
    model metadata; readers that do not know the name ignore it)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(to_json(meta).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_KEY.encode()] + [entry]
    flatbuffer_utils.write_model(model, str(path))
    return meta


def read_metadata(path: Path) -> dict[str, Any] | None:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for m in model.metadata or []:
        if m.name in (METADATA_KEY, METADATA_KEY.encode()):
            return from_json(bytes(model.buffers[m.buffer].data))
    return None


def describe(path: Path) -> dict[str, Any]:
    return {**op_summary(path), "xnnpack_delegation": xnnpack_delegation(path)}


def _writer(build, example: tuple[torch.Tensor, ...], int8: bool, meta: dict[str, Any]):
    def write(tmp: Path) -> dict[str, Any]:
        (model, quantizer), step = quantize_step(build) if int8 else (build(), {})
        convert(model, example, tmp, quantizer)
        embed_metadata(tmp, meta)
        summary = op_summary(tmp)
        if int8 and summary["compute_ops_int8"] < summary["compute_ops"]:
            raise ExportError(f"int8 recipe left {summary['compute_ops'] - summary['compute_ops_int8']} of "
                              f"{summary['compute_ops']} conv/fully-connected ops in float")
        return {"graph": summary, "xnnpack_delegation": xnnpack_delegation(tmp),
                "embedded_metadata": read_metadata(tmp), **step}
    return write


def export_litert(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                  calib_samples: list[Sample] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                  layout: str = "nhwc", **_: Any) -> list[ArtifactEntry]:
    """model.tflite (litert_fp32) and model_int8.tflite (litert_int8), each run in LiteRT's interpreter."""
    check_variants(variants, VARIANTS)
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout}: choose from {list(LAYOUTS)}")
    if "int8" in variants:
        require_calibration(calib_samples, "LiteRT int8", ALTERNATIVES)
    out_dir = Path(out_dir)
    try:
        import ai_edge_litert  # noqa: F401  (the runner needs it)
        import litert_torch  # noqa: F401
    except ImportError as err:
        return [record_failed(ckpt, out_dir, VARIANTS[v], f"LiteRT is not installed ({err}); pip install "
                              f"litert-torch ai-edge-litert") for v in variants]
    inputs = eval_inputs(ckpt, eval_samples)
    ref = reference_logits(ckpt, inputs.x)
    example = example_input(ckpt.spec, layout)
    base = {"input_layout": layout.upper(), "input_range": [0.0, 1.0], "batch": "fixed at 1",
            "normalization_in_graph": True, "converter": "litert_torch.convert", "spec": ckpt.spec.to_dict()}
    rows = []
    if "fp32" in variants:
        rows.append(write_proven(ckpt, out_dir, "litert_fp32", details=base,
                                 write=_writer(lambda: (deploy_model(ckpt, layout), None),
                                               example, int8=False,
                                               meta=embedded_metadata(ckpt, "litert_fp32", layout)),
                                 prove=prove_in_runtime("litert_fp32", ref, inputs)))
    if "int8" in variants:
        from quantize.pt2e import LITERT_INT8_SCHEME, quantize_pt2e_litert

        calib, note = calib_inputs(ckpt, calib_samples)
        images = calib.transpose(0, 2, 3, 1) if layout == "nhwc" else calib
        details = {**base, "quantization": {**LITERT_INT8_SCHEME, "calibration": note}}
        build = lambda: quantize_pt2e_litert(deploy_model(ckpt, layout, int8_stem=True), example, images)  # noqa: E731
        rows.append(write_proven(ckpt, out_dir, "litert_int8", details=details,
                                 write=_writer(build, example, int8=True,
                                               meta=embedded_metadata(ckpt, "litert_int8", layout)),
                                 prove=prove_in_runtime("litert_int8", ref, inputs)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.litert", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--variants", default="fp32,int8", help="comma-separated: fp32, int8 (default both)")
    p.add_argument("--layout", default="nhwc", choices=LAYOUTS,
                   help="input layout: nhwc (default; what tflite_flutter apps build from image bytes) or nchw")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_litert, argv,
                   lambda a: {"variants": variants_option(a.variants, VARIANTS), "layout": a.layout},
                   static_int8=lambda o: "int8" in o["variants"], alternatives=ALTERNATIVES)


if __name__ == "__main__":
    sys.exit(main())
