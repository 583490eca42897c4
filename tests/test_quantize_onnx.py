"""ONNX Runtime int8: dynamic and static QDQ files that load and run in ONNX Runtime, with the graph
summary saying what was quantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.onnx import INPUT_NAME
from export.runners import get_runner
from train.metrics import compare_logits
from quantize.onnx_rt import OnnxQuantError, dynamic_int8_onnx, static_int8_onnx
from train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory, tiny_checkpoint):
    from export.onnx import write_onnx

    ckpt = load_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    write_onnx(ckpt.build_deploy_model(), ckpt.spec, path)
    return path


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, size, size), dtype=np.float32)


def _initializers(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_dynamic_quantizes_conv_and_linear(float_onnx, tmp_path):
    info = dynamic_int8_onnx(float_onnx, tmp_path / "dyn.onnx")
    assert info["integer_ops"] == {"ConvInteger": 20, "MatMulInteger": 1}  # ResNet-18: 20 convs + fc
    assert info["size_ratio"] < 0.3
    x = _images(4)
    ref = get_runner("onnxruntime").load(float_onnx).run(x)
    out = get_runner("onnxruntime").load(tmp_path / "dyn.onnx").run(x)
    assert out.shape == ref.shape and compare_logits(ref, out)["mean_abs_logit_diff"] < 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["dyn.onnx"]  # single file, no temp left behind


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
def test_static_qdq_per_channel(float_onnx, tmp_path, method):
    info = static_int8_onnx(float_onnx, tmp_path / "static.onnx", _images(8), method=method)
    assert info["format"] == "QDQ" and info["per_channel"] and info["calibration_method"] == method
    assert info["qdq_weight_ops"] == {"Conv": 20, "Gemm": 1} and not info["float_weighted_ops"]
    x = _images(4)
    ref = get_runner("onnxruntime").load(float_onnx).run(x)
    out = get_runner("onnxruntime").load(tmp_path / "static.onnx").run(x)
    assert compare_logits(ref, out)["mean_abs_logit_diff"] < 0.1


def test_static_rejects_bad_calibration(float_onnx, tmp_path):
    with pytest.raises(OnnxQuantError, match=r"\[0, 1\]"):
        static_int8_onnx(float_onnx, tmp_path / "s.onnx", _images(2) * 5 - 2)  # normalized, not [0, 1]
    with pytest.raises(OnnxQuantError, match="non-empty"):
        static_int8_onnx(float_onnx, tmp_path / "s.onnx", np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(OnnxQuantError, match="MinMax"):
        static_int8_onnx(float_onnx, tmp_path / "s.onnx", _images(2), method="KL")
    with pytest.raises(OnnxQuantError, match="export one first"):
        dynamic_int8_onnx(tmp_path / "missing.onnx", tmp_path / "d.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["MinMax", "Percentile"])
@pytest.mark.parametrize("cache", [True, False], ids=["ranges-handed-over", "older-ort"])
def test_static_ranges_equal_quantize_statics_own_calibration(float_onnx, tmp_path, monkeypatch, method, cache):
    """static_int8_onnx gathers the ranges with ORT's calibrator in a session of its own (threads capped) and
    hands them to quantize_static as a calibration cache, or, on an ORT whose quantize_static takes no cache
    (1.23, Python 3.10's), lets it calibrate: either way the file holds exactly what quantize_static writes
    when it calibrates by itself (a numerics check on generated inputs)."""
    import quantize.onnx_rt as onnx_rt

    if cache and not onnx_rt.takes_calibration_cache():
        pytest.skip("this ONNX Runtime's quantize_static takes no calibration cache")
    monkeypatch.setattr(onnx_rt, "takes_calibration_cache", lambda: cache)
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from quantize.onnx_rt import _ArrayReader, _preprocess
    from quantize.stem import space_to_depth_stem_onnx

    x = _images(16)
    static_int8_onnx(float_onnx, tmp_path / "ours.onnx", x, method=method, threads=1, x86_isa="vnni")
    model_in, _ = _preprocess(float_onnx, tmp_path)
    assert space_to_depth_stem_onnx(model_in, tmp_path / "stem.onnx")  # what static_int8_onnx quantizes
    model_in = tmp_path / "stem.onnx"
    name = onnx.load(str(model_in), load_external_data=False).graph.input[0].name
    quantize_static(str(model_in), str(tmp_path / "ort.onnx"), _ArrayReader(name, x, 8), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), reduce_range=False,
                    extra_options={"CalibStridedMinMax": 1,  # a batch at a time, as static_int8_onnx does
                                   **({"CalibPercentile": 99.999} if method == "Percentile" else {})})

    ours, theirs = _initializers(tmp_path / "ours.onnx"), _initializers(tmp_path / "ort.onnx")
    assert set(ours) == set(theirs) and any(k.endswith("_scale") for k in ours)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def _assert_same_int8_file(a: Path, b: Path, x: np.ndarray) -> None:
    """The same ops in the same order, every initializer equal, the same logits in ONNX Runtime."""
    import onnx

    graphs = [onnx.load(str(f)).graph for f in (a, b)]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    weights = [_initializers(f) for f in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    run = get_runner("onnxruntime")
    assert np.array_equal(run.load(a).run(x), run.load(b).run(x))


def test_a_graph_preprocessed_and_calibrated_once_quantizes_as_when_done_each_time(float_onnx, tmp_path):
    """node_sensitivity runs ORT's pre-pass and calibration once and quantizes that graph once per node: the
    files must be the ones static_int8_onnx writes from the float graph, excluded nodes included (a numerics
    check on generated inputs)."""
    from quantize.onnx_rt import _ArrayReader, _preprocess, calibrated_ranges, weighted_nodes

    x, nodes = _images(8), weighted_nodes(float_onnx)
    pre, err = _preprocess(float_onnx, tmp_path)
    assert err is None
    a = static_int8_onnx(float_onnx, tmp_path / "each.onnx", x, nodes_to_exclude=nodes[1:])  # the stem rewrite applies
    b = static_int8_onnx(pre, tmp_path / "once.onnx", x, nodes_to_exclude=nodes[1:], preprocess=False)
    assert a["qdq_weight_ops"] == b["qdq_weight_ops"] == {"Conv": 1} and a["stem"] == b["stem"]
    _assert_same_int8_file(tmp_path / "each.onnx", tmp_path / "once.onnx", x)
    others = [n for n in nodes if n != nodes[2]]  # one layer quantized, the stem float: given ranges are used
    ranges = calibrated_ranges(pre, _ArrayReader(INPUT_NAME, x, 8), "MinMax", None, tmp_path)
    static_int8_onnx(pre, tmp_path / "calibrated.onnx", x, nodes_to_exclude=others, preprocess=False)
    c = static_int8_onnx(pre, tmp_path / "given.onnx", x, nodes_to_exclude=others, preprocess=False, ranges=ranges)
    assert c["qdq_weight_ops"] == {"Conv": 1} and not c["stem"]
    _assert_same_int8_file(tmp_path / "calibrated.onnx", tmp_path / "given.onnx", x)
