"""ONNX in, int8 ONNX out, with ONNX Runtime's own quantizer (dynamic, and static QDQ with calibration).

Both functions write one self-contained file atomically and return an info dict that says, from the
written graph itself, which operator types were quantized, so the report never relies on prose.
`onnxruntime.quantization` is heavy, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantize.stem import space_to_depth_stem_onnx
from train.atomic import atomic_path
from train.errors import ToolkitError

log = logging.getLogger(__name__)

CALIB_METHODS = ("MinMax", "Entropy", "Percentile")
# Operators ONNX Runtime emits when it quantizes in operator (QOperator) form, e.g. dynamic mode.
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QAttention", "DynamicQuantizeLSTM"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
WEIGHTED_OPS = {"Conv", "Gemm", "MatMul"}


class OnnxQuantError(ToolkitError, RuntimeError):
    """An ONNX file or calibration set that ONNX Runtime cannot quantize; the message says what to do."""


def graph_summary(path: str | Path) -> dict[str, Any]:
    """Count what is quantized in a written graph.

    QOperator graphs (dynamic mode) show integer operators (ConvInteger, MatMulInteger, ...). QDQ graphs
    keep float operators but wrap them in DequantizeLinear inputs; a float op whose *weight* (an
    initializer) comes through DequantizeLinear is counted as quantized.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    dq_from_init = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    dq_any = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    ops = Counter(n.op_type for n in graph.node)
    integer = Counter(n.op_type for n in graph.node if n.op_type in INTEGER_OPS)
    qdq_weight = Counter(n.op_type for n in graph.node if n.op_type not in QDQ_OPS
                         and any(i in dq_from_init for i in n.input))

    def int8_weight(n) -> bool:  # a dequantized activation alone (from an int8 Add before it) is not int8
        return len(n.input) > 1 and n.input[1] in dq_from_init

    qdq_act = Counter(n.op_type for n in graph.node if n.op_type not in QDQ_OPS
                      and (int8_weight(n) if n.op_type in WEIGHTED_OPS else any(i in dq_any for i in n.input)))
    float_weighted = Counter(n.op_type for n in graph.node if n.op_type in WEIGHTED_OPS and not int8_weight(n))
    return {
        "op_counts": dict(sorted(ops.items())),
        "integer_ops": dict(sorted(integer.items())),
        "qdq_weight_ops": dict(sorted(qdq_weight.items())),
        "qdq_ops": dict(sorted(qdq_act.items())),
        "float_weighted_ops": dict(sorted(float_weighted.items())),
        "quantized_node_count": int(sum(integer.values()) + sum(qdq_act.values())),
    }


def _describe(summary: dict[str, Any]) -> str:
    touched = {**summary["integer_ops"], **summary["qdq_ops"]}
    parts = [f"{n} {op}" for op, n in sorted(touched.items())]
    left = [f"{n} {op}" for op, n in sorted(summary["float_weighted_ops"].items())]
    return (("quantized: " + ", ".join(parts)) if parts else "nothing quantized") + \
        ("; left float: " + ", ".join(left) if left else "")


def _check_src(src: str | Path) -> Path:
    src = Path(src)
    if not src.is_file():
        raise OnnxQuantError(f"ONNX model {src} does not exist; export one first (python -m export.onnx)")
    return src


def _preprocess(src: Path, tmp_dir: Path) -> tuple[Path, str | None]:
    """ORT's recommended pre-pass (graph optimisation folds BatchNorm into Conv, shape inference).
    A failure is logged and the original graph used: quantization still works, only less neatly."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp_dir / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
        return out, None
    except Exception as err:  # the pre-pass is an optimisation, not a requirement
        log.warning("quant_pre_process failed on %s (%s); quantizing the graph as it is", src, err)
        return src, f"{type(err).__name__}: {err}"


def _file_info(dst: Path, src: Path) -> dict[str, Any]:
    from train.atomic import size_bytes

    return {"path": str(dst), "size_bytes": size_bytes(dst), "float_size_bytes": size_bytes(src),
            "size_ratio": size_bytes(dst) / max(1, size_bytes(src))}


def dynamic_int8_onnx(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """ORT dynamic 8-bit: 8-bit weights for every Conv and MatMul/Gemm, activations quantized to uint8 on the
    fly at run time. No calibration data needed.

    Weights are QUInt8 (asymmetric, with a zero point): ONNX Runtime's ConvInteger is fast for uint8 x uint8
    on x86, while int8 (QInt8) weights took a slow path: 118.5 ms per image at 1 thread against 30.9 ms for
    QUInt8 and 34 ms for float (AMD EPYC, AVX-512 VNNI). No saturation either: U8U8 widens to 16 bits."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _check_src(src)
    with tempfile.TemporaryDirectory(prefix="ortq.") as tmp, atomic_path(dst) as out:
        model_in, pre_err = _preprocess(src, Path(tmp))
        try:
            quantize_dynamic(str(model_in), str(out), weight_type=QuantType.QUInt8,
                             use_external_data_format=False)
        except Exception as err:
            raise OnnxQuantError(f"ONNX Runtime dynamic quantization failed on {src}: {err}") from err
        summary = graph_summary(out)
    info = {"mode": "dynamic", "format": "QOperator", "weight_type": "QUInt8", "activations": "dynamic uint8",
            "per_channel": False, "preprocessed": pre_err is None, "preprocess_error": pre_err,
            "onnxruntime_version": onnxruntime.__version__, **summary, "touched": _describe(summary)}
    info.update(_file_info(Path(dst), src))
    log.info("ORT dynamic int8 -> %s (%s)", dst, info["touched"])
    return info


class _ArrayReader:
    """CalibrationDataReader over an in-memory array, in batches, with the range API ORT uses to
    collect statistics a slice at a time (keeps memory bounded for histogram methods)."""

    def __init__(self, input_name: str, calib: np.ndarray, batch_size: int, progress: bool = False) -> None:
        from tqdm import tqdm

        self.input_name = input_name
        self.batches = [calib[i:i + batch_size] for i in range(0, len(calib), batch_size)]
        self.bar = tqdm(total=len(self.batches), desc="calibrating (ONNX Runtime)", unit="batch",
                        disable=not progress, leave=False)
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is not None:
            self.bar.update(1)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def check_calibration_array(calib: np.ndarray, input_size: int | None = None) -> np.ndarray:
    """Calibration input must look like model input: float32 (N, 3, H, W) in [0, 1], N >= 1."""
    calib = np.asarray(calib)
    if calib.ndim != 4 or calib.shape[1] != 3 or len(calib) == 0:
        raise OnnxQuantError(f"calibration data must be a non-empty (N, 3, H, W) array, got shape "
                             f"{calib.shape}; pass images from the training split (train.data.load_batch)")
    if input_size is not None and calib.shape[2:] != (input_size, input_size):
        raise OnnxQuantError(f"calibration images are {calib.shape[2:]} but the model takes "
                             f"{input_size}x{input_size}")
    if calib.min() < -1e-3 or calib.max() > 1 + 1e-3:
        raise OnnxQuantError(f"calibration data must be in [0, 1] (the model normalizes inside), got "
                             f"range [{calib.min():.3f}, {calib.max():.3f}]; do not pass normalized images")
    return calib.astype(np.float32, copy=False)


def _check_static_settings(method: str, activation_type: str) -> None:
    """The calibration method and activation type name ORT settings; anything else is the user's typo."""
    if method not in CALIB_METHODS:
        raise OnnxQuantError(f"--calib-method must be one of {CALIB_METHODS}, got {method!r}")
    if activation_type not in ("QUInt8", "QInt8"):
        raise OnnxQuantError(f"activation_type must be 'QUInt8' or 'QInt8', got {activation_type!r}")


def static_int8_onnx(src: str | Path, dst: str | Path, calib: np.ndarray, method: str = "MinMax",
                     per_channel: bool = True, batch_size: int = 8, progress: bool = False,
                     activation_type: str = "QUInt8", x86_isa: str = "vnni",
                     nodes_to_exclude: Sequence[str] = (), threads: int | None = None,
                     preprocess: bool = True, ranges: Any = None) -> dict[str, Any]:
    """ORT static int8 in QDQ format: int8 weights (per channel) and 8-bit activations whose ranges
    come from `calib`, float32 (N, 3, H, W) images in [0, 1] from the training split.

    Activations default to QUInt8 (U8S8): on x86 ONNX Runtime's fast int8 kernels are u8 x s8; with
    QInt8 activations the QDQ model ran slower than float here (101 vs 87 ms; U8S8: 35 ms). On CPUs
    without VNNI, U8S8 sums pairs of products in int16 and can saturate (7 of 819 val images flipped on
    an AVX2 EPYC): `x86_isa` 'avx2' (or 'auto' on such a CPU, see quantize.torch_ao.resolve_x86_isa)
    quantizes weights to 7 bits (ORT's reduce_range, -64..64), so 2 x 255 x 64 < 32768 and the fast kernels
    stay exact on every x86-64 CPU. The stem convolution is rewritten as space-to-depth + a 4x4 convolution
    first (quantize.stem: int8 kernels waste most of a 3-channel convolution's work); `info['stem']` says so.
    `nodes_to_exclude` keeps those nodes in float (the accuracy-aware
    fallback). `threads` caps the calibration session's intra-op threads (ORT's default, every core, when None;
    see calibrated_ranges). `preprocess=False` skips ORT's pre-pass for a graph that has already had it, and
    `ranges` are calibrated_ranges already computed on that graph with `calib` (node_sensitivity quantizes one
    graph once per node); they are not used where the stem is rewritten (new tensors need ranges)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    from quantize.torch_ao import resolve_x86_isa

    _check_static_settings(method, activation_type)
    target = resolve_x86_isa(x86_isa, "onnxruntime")
    reduce_range = target == "avx2"
    src = _check_src(src)
    calib = check_calibration_array(calib)
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    reader = _ArrayReader(input_name, calib, batch_size, progress)
    with tempfile.TemporaryDirectory(prefix="ortq.") as tmp, atomic_path(dst) as out:
        model_in, pre_err = _preprocess(src, Path(tmp)) if preprocess else (src, None)
        stem = space_to_depth_stem_onnx(model_in, Path(tmp) / "stem.onnx", keep=set(nodes_to_exclude))
        model_in = Path(tmp) / "stem.onnx" if stem else model_in
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints per-batch chatter
                _quantize_static(model_in, out, reader, method, threads, Path(tmp), None if stem else ranges,
                                 quant_format=QuantFormat.QDQ,
                                 per_channel=per_channel, activation_type=getattr(QuantType, activation_type),
                                 weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                                 use_external_data_format=False, reduce_range=reduce_range,
                                 nodes_to_exclude=list(nodes_to_exclude) or None)
        except Exception as err:
            raise OnnxQuantError(f"ONNX Runtime static quantization failed on {src}: {err}") from err
        finally:
            reader.bar.close()
        summary = graph_summary(out)
    info = {"mode": "static", "format": "QDQ", "weight_type": "QInt8 (7-bit, reduce_range)" if reduce_range
            else "QInt8", "reduce_range": reduce_range, "x86_isa": target, "x86_isa_requested": x86_isa,
            "nodes_excluded": list(nodes_to_exclude), "activation_type": activation_type,
            "per_channel": per_channel, "calibration_method": method, "calibration_images": int(len(calib)),
            "preprocessed": pre_err is None, "preprocess_error": pre_err, "stem": stem,
            "onnxruntime_version": onnxruntime.__version__, **summary, "touched": _describe(summary),
            **_file_info(Path(dst), src)}
    log.info("ORT static int8 (%s) -> %s (%s)", method, dst, info["touched"])
    return info


def takes_calibration_cache() -> bool:
    """Whether this ONNX Runtime's quantize_static takes precomputed ranges (`calibration_cache_path`): recent
    releases do; 1.23, the newest for Python 3.10, does not."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _quantize_static(model_in: Path, out: Path, reader: _ArrayReader, method: str, threads: int | None,
                     tmp_dir: Path, ranges: Any = None, **options: Any) -> None:
    """quantize_static with ranges from calibrated_ranges (those given, else calibrated now) where this ORT takes
    them; otherwise ORT calibrates by itself, a batch at a time (its session then has every core)."""
    from onnxruntime.quantization import quantize_static

    if not takes_calibration_cache():
        extra = {"CalibStridedMinMax": 1, **({"CalibPercentile": 99.999} if method == "Percentile" else {})}
        quantize_static(str(model_in), str(out), reader, extra_options=extra, **options)
        return
    from onnxruntime.quantization import save_tensors_data

    cache = tmp_dir / "ranges.json"
    save_tensors_data(ranges if ranges is not None else calibrated_ranges(model_in, reader, method, threads, tmp_dir),
                      cache)
    quantize_static(str(model_in), str(out), None, calibration_cache_path=cache, **options)


def calibrated_ranges(model_in: Path, reader: _ArrayReader, method: str, threads: int | None, tmp_dir: Path) -> Any:
    """Activation ranges from ONNX Runtime's own calibrator (create_calibrator, what quantize_static runs, over
    the tensors of every op type ORT quantizes, a batch at a time), its session held to `threads`. quantize_static
    gives that session every core: in an export worker beside another, its idle threads spin on the other
    worker's core (2-core EPYC, beside a busy 1-thread process: 20-24 s with ORT's default, 16 s with 1 thread,
    and the neighbour ran 30% faster)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(model_in, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(tmp_dir / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method),
                                   extra_options={"percentile": 99.999} if method == "Percentile" else {})
    if threads:  # create_calibrator opened a session with every core (ORT offers no options for it): replace it
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's: every tensor seen
        opts.intra_op_num_threads = threads
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, opts,
                                                        providers=["CPUExecutionProvider"])
    for start in range(len(reader)):  # one batch at a time: bounded memory for the histogram methods
        reader.set_range(start, start + 1)
        calibrator.collect_data(reader)
    return calibrator.compute_data()


def weighted_nodes(path: str | Path) -> list[str]:
    """Names of the Conv / Gemm / MatMul nodes of a float graph, in graph order (what static int8 touches)."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in WEIGHTED_OPS]


def node_sensitivity(src: str | Path, calib: np.ndarray, *, x86_isa: str = "vnni", sample_size: int = 32,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Rank the float graph's weighted nodes by the logit error that quantizing each one alone causes, on
    `sample_size` calibration (train) images: the ONNX Runtime side of the accuracy-aware fallback."""
    import onnxruntime
    from tqdm import tqdm

    src = _check_src(src)
    x = check_calibration_array(calib)[:sample_size]
    ref_sess = onnxruntime.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    name = ref_sess.get_inputs()[0].name
    ref = ref_sess.run(None, {name: x})[0]
    nodes = weighted_nodes(src)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ortsens.") as tmp:
        pre, _ = _preprocess(src, Path(tmp))  # once, not per node (ResNet-18's 21: 71.1 -> 61.3 s, Zen 3)
        method, batch = "MinMax", 8  # the ranges computed once are those each static_int8_onnx call would compute
        ranges = (calibrated_ranges(pre, _ArrayReader(name, x, batch), method, None, Path(tmp))
                  if takes_calibration_cache() else None)
        for node in tqdm(nodes, desc="node sensitivity (ONNX Runtime)", unit="node", disable=not progress, leave=False):
            dst = Path(tmp) / "one.onnx"
            others = [n for n in nodes if n != node]
            static_int8_onnx(pre, dst, x, method=method, batch_size=batch, x86_isa=x86_isa, nodes_to_exclude=others,
                             preprocess=False, ranges=ranges)
            out = onnxruntime.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
            rows.append({"layer": node, "mean_abs_logit_error": float(np.abs(out - ref).mean()),
                         "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean())})
    rows.sort(key=lambda r: r["mean_abs_logit_error"], reverse=True)
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return rows
