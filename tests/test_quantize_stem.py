"""quantize.stem: the stem convolution as space-to-depth + 4x4 convolution, in PyTorch and in ONNX, gives the
same outputs (numerics checks on generated inputs) and reaches the int8 files that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from quantize.stem import SpaceToDepthStem, space_to_depth_stem, space_to_depth_stem_onnx
from train.checkpoint import load_checkpoint


@pytest.mark.parametrize("bias", [False, True])
def test_rewritten_stem_equals_the_7x7_stride_2_convolution(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=bias)
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        assert torch.allclose(SpaceToDepthStem(conv)(x), conv(x), atol=1e-5)


def test_deploy_model_keeps_its_logits_and_odd_sizes_keep_their_stem(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    plain, rewritten = ckpt.build_deploy_model().eval(), space_to_depth_stem(ckpt.build_deploy_model().eval(), 32)
    assert isinstance(rewritten.net.conv1, SpaceToDepthStem) and rewritten.net.conv1.conv.weight.shape == (64, 12, 4, 4)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), rewritten(x), atol=1e-4)
    assert isinstance(space_to_depth_stem(ckpt.build_deploy_model(), 33).net.conv1, nn.Conv2d)  # no 2x2 blocks


@pytest.fixture(scope="module")
def preprocessed_onnx(tmp_path_factory, tiny_checkpoint):
    from export.onnx import write_onnx
    from quantize.onnx_rt import _preprocess

    ckpt = load_checkpoint(tiny_checkpoint)
    out = tmp_path_factory.mktemp("stem")
    write_onnx(ckpt.build_deploy_model(), ckpt.spec, out / "model.onnx")
    return _preprocess(out / "model.onnx", out)[0]


def _conv_names(path):
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}


def test_onnx_rewrite_runs_the_same_in_onnx_runtime_under_the_same_node_names(preprocessed_onnx, tmp_path):
    import onnx

    from export.runners import get_runner

    info = space_to_depth_stem_onnx(preprocessed_onnx, tmp_path / "stem.onnx")
    assert info["weight"] == [64, 12, 4, 4] and info["rewritten"] in _conv_names(preprocessed_onnx)
    assert _conv_names(tmp_path / "stem.onnx") == _conv_names(preprocessed_onnx)  # nodes_to_exclude still apply
    assert [n.op_type for n in onnx.load(str(tmp_path / "stem.onnx")).graph.node].count("SpaceToDepth") == 1
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    ref = get_runner("onnxruntime").load(preprocessed_onnx).run(x)
    assert np.abs(get_runner("onnxruntime").load(tmp_path / "stem.onnx").run(x) - ref).max() <= 1e-4
    assert space_to_depth_stem_onnx(preprocessed_onnx, tmp_path / "kept.onnx", keep={info["rewritten"]}) is None
    assert not (tmp_path / "kept.onnx").exists()


def test_static_int8_file_carries_the_rewrite_unless_the_stem_stays_float(preprocessed_onnx, tmp_path):
    import onnx

    from quantize.onnx_rt import static_int8_onnx

    x = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
    info = static_int8_onnx(preprocessed_onnx, tmp_path / "q.onnx", x)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert info["stem"]["rewritten"] and "SpaceToDepth" in ops and info["qdq_weight_ops"]["Conv"] == 20
    kept = static_int8_onnx(preprocessed_onnx, tmp_path / "k.onnx", x, nodes_to_exclude=[info["stem"]["rewritten"]])
    assert kept["stem"] is None and "SpaceToDepth" not in [n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node]
    assert kept["float_weighted_ops"]  # the stem convolution, left in float as asked
    from quantize.onnx_rt import weighted_nodes

    middle = weighted_nodes(preprocessed_onnx)[5:7]  # their input comes dequantized from an int8 Add or conv
    fallback = static_int8_onnx(preprocessed_onnx, tmp_path / "m.onnx", x, nodes_to_exclude=middle)
    assert fallback["float_weighted_ops"] == {"Conv": 2} and fallback["qdq_weight_ops"]["Conv"] == 18  # said 20, 0


def test_undo_gives_the_phone_graph_the_same_integers(preprocessed_onnx, tmp_path):
    import onnx

    from export.runners import get_runner
    from quantize.onnx_rt import static_int8_onnx
    from quantize.stem import undo_space_to_depth_stem_onnx

    x = np.random.default_rng(2).random((8, 3, 32, 32), dtype=np.float32)
    # 7-bit weights: ONNX Runtime's u8 x s8 kernels on CPUs without VNNI add pairs of products in int16 and
    # saturate 8-bit ones, differently for the 12-channel and the 3-channel stem; with 7 bits every CPU
    # computes exact sums, so the two graphs must give the same logits on AVX2 and VNNI machines alike.
    info = static_int8_onnx(preprocessed_onnx, tmp_path / "q.onnx", x, x86_isa="avx2")
    assert undo_space_to_depth_stem_onnx(tmp_path / "q.onnx", tmp_path / "whole.onnx") == info["stem"]["rewritten"]
    graph = onnx.load(str(tmp_path / "whole.onnx")).graph
    assert "SpaceToDepth" not in [n.op_type for n in graph.node]
    stem = next(n for n in graph.node if n.name == info["stem"]["rewritten"])
    assert {a.name: list(a.ints) for a in stem.attribute} == {"kernel_shape": [7, 7], "strides": [2, 2], "pads": [3] * 4}
    run = get_runner("onnxruntime")
    assert np.array_equal(run.load(tmp_path / "whole.onnx").run(x), run.load(tmp_path / "q.onnx").run(x))
    assert undo_space_to_depth_stem_onnx(tmp_path / "whole.onnx", tmp_path / "again.onnx") is None
