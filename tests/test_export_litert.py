"""export.litert: .tflite files proven in LiteRT's own interpreter, in the layout apps feed, with the int8 recipe
checked op by op (the registry-parametrized test in test_export_all covers the common contract)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

import export.litert as xlt  # noqa: E402
from export.runners import get_runner  # noqa: E402
from train.data import load_batch  # noqa: E402

pytestmark = pytest.mark.xdist_group("exports")  # the modules that read conftest's all_formats


@pytest.fixture(scope="module")
def nhwc(format_rows):
    return format_rows("litert")


def test_default_layout_is_nhwc_and_the_runner_transposes_correctly(nhwc, ckpt, export_samples):
    from ai_edge_litert.interpreter import Interpreter

    out, rows = nhwc
    e = rows["litert_fp32"]
    assert e.status == "verified" and e.details["input_layout"] == "NHWC"
    assert e.details["graph"]["input"]["shape"] == [1, 32, 32, 3] and e.details["graph"]["output"]["dtype"] == "float32"
    assert e.details["xnnpack_delegation"]["partitions"] == 1 and e.details["xnnpack_delegation"]["delegation_coverage"] == 1
    x = load_batch(export_samples[0], ckpt.spec)
    it = Interpreter(model_path=str(out / e.path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x[:1].transpose(0, 2, 3, 1)))
    it.invoke()  # what an app does: NHWC bytes in, logits out
    direct = it.get_tensor(it.get_output_details()[0]["index"])
    assert np.abs(get_runner("litert").load(out / e.path).run(x[:1]) - direct).max() == 0
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    assert np.abs(direct - ref[:1]).max() <= 1e-4


def test_int8_file_runs_every_conv_and_fc_in_int8(nhwc, ckpt, export_samples):
    out, rows = nhwc
    e = rows["litert_int8"]
    g = e.details["graph"]
    assert e.status == "verified" and g["compute_ops"] == 21 and g["compute_ops_int8"] == 21  # 20 conv + fc
    assert g["operators"].get("ADD(int8)") == 8 and g["float_adds"] == 0  # the residual adds too
    assert g["dequantize_ops"] == 0  # no round trip to float inside the graph
    assert g["operators"].get("MAX_POOL_2D(int8)") == 1 and not any(k.startswith("QUANTIZE(int8") for k in g["operators"])
    assert e.details["xnnpack_delegation"]["partitions"] == 1 and e.details["xnnpack_delegation"]["ops_outside_delegate"] == {}
    assert g["output"]["dtype"] == "int8" and g["output"]["scale"] > 0  # logits = scale * (q - zero_point)
    assert e.details["quantization"]["calibration"].startswith("8 images from the train split")
    assert (out / "model_int8.tflite").stat().st_size < 0.3 * (out / "model.tflite").stat().st_size
    x = load_batch(export_samples[0], ckpt.spec)
    logits = get_runner("litert").load(out / e.path).run(x)
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and logits.shape == (4, ckpt.spec.num_classes)


def test_zero_padded_maxpool_is_exact_and_keeps_the_graph_in_one_xnnpack_partition(tmp_path, ckpt):
    import torch

    plain, padded = ckpt.build_deploy_model(), xlt.zero_padded_maxpool(ckpt.build_deploy_model())
    assert isinstance(padded.net.maxpool, torch.nn.Sequential)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), padded(x))  # the pool follows a ReLU: zero and -inf padding agree
    example = xlt.example_input(ckpt.spec, "nhwc")
    xlt.convert(xlt.layout_model(plain, "nhwc", ckpt.spec.input_size), example, tmp_path / "plain.tflite")
    split = xlt.xnnpack_delegation(tmp_path / "plain.tflite")  # -inf padding becomes PADV2, which XNNPACK leaves out
    assert split["partitions"] == 2 and split["ops_outside_delegate"] == {"PADV2": 1}
    xlt.convert(xlt.layout_model(padded, "nhwc", ckpt.spec.input_size), example, tmp_path / "padded.tflite")
    whole = xlt.xnnpack_delegation(tmp_path / "padded.tflite")
    assert whole["partitions"] == 1 and whole["delegated_ops"] == whole["ops"]


@pytest.mark.parametrize("stretch", [False, True])
def test_nhwc_model_normalizes_whole_rows_and_equals_the_deploy_model(ckpt, stretch):
    import dataclasses

    import torch

    from train.model import DeployModel

    spec = dataclasses.replace(ckpt.spec, contrast_stretch=stretch)
    deploy = DeployModel(ckpt.build_deploy_model().net, spec).eval()
    nhwc = xlt.layout_model(deploy, "nhwc", spec.input_size)
    assert nhwc.mean_row.shape == (3 * spec.input_size,)  # one constant per row value, not per channel
    x = torch.rand(2, spec.input_size, spec.input_size, 3)
    with torch.no_grad():
        assert torch.allclose(nhwc(x), deploy(x.permute(0, 3, 1, 2)), atol=1e-5)


def test_the_file_normalizes_rows_not_pixels(nhwc):
    from ai_edge_litert.interpreter import Interpreter

    out, rows = nhwc
    for name in ("litert_fp32", "litert_int8"):
        it = Interpreter(model_path=str(out / rows[name].path))
        shapes = {t["index"]: list(t["shape"]) for t in it.get_tensor_details()}
        ops = {o["op_name"]: o for o in it._get_ops_details() if o["op_name"] in ("SUB", "MUL")}
        assert set(ops) == {"SUB", "MUL"}
        for op in ops.values():  # a 3-value constant broadcast over NHWC would cost XNNPACK one call per pixel
            assert sorted(shapes[i][-1] for i in op["inputs"]) == [32 * 3, 32 * 3], (name, op)


def test_nchw_layout_on_request(tmp_path, ckpt, export_samples):
    (e,) = xlt.export_litert(ckpt, tmp_path, eval_samples=export_samples[0], variants=("fp32",), layout="nchw")
    assert e.status == "verified" and e.details["input_layout"] == "NCHW"
    assert e.details["graph"]["input"]["shape"] == [1, 3, 32, 32]


@pytest.mark.parametrize("argv, message", [
    (["--layout", "nhcw"], "--layout"),
    (["--variants", "int8"], "real calibration images"),
    (["--variants", "fp16"], "--variants"),
])
def test_cli_rejects_bad_input_before_writing(tiny_checkpoint, tmp_path, capsys, argv, message):
    try:
        code = xlt.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:  # argparse's own choice check
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
