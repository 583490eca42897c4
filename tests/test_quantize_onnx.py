"""ONNX Runtime int8: dynamic and static QDQ files that load and run in ONNX Runtime, with the graph
summary saying what was quantized."""

from __future__ import annotations

import numpy as np
import pytest

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
