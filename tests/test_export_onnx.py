"""export.onnx: one self-contained, dynamic-batch ONNX file proven in ONNX Runtime, plus the int8 variants."""

from __future__ import annotations

import numpy as np
import pytest

import export.onnx as xonnx
from export.manifest import read_manifest, verify_file
from export.runners import get_runner
from train.data import load_batch, seeded_subset


@pytest.fixture(scope="module")
def samples(synthetic_index):
    idx = synthetic_index
    return seeded_subset(idx.samples, 6, seed=1), seeded_subset(idx.samples, 8, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt, samples):
    out = tmp_path_factory.mktemp("onnx")
    eval_s, calib_s = samples
    rows = xonnx.export_onnx(ckpt, out, eval_samples=eval_s, calib_samples=calib_s)
    return out, {r.name: r for r in rows}


def test_fp32_matches_pytorch_in_ort_with_dynamic_batch(exported, ckpt, samples):
    out, rows = exported
    e = rows["onnx_fp32"]
    assert e.status == "verified" and e.path == "model.onnx" and e.runtime == "onnxruntime"
    assert e.verification["max_abs_logit_diff"] <= 1e-4 and e.verification["tolerance"] == 1e-4
    x = load_batch(samples[0][:3], ckpt.spec)
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    runner = get_runner("onnxruntime", threads=1).load(out / "model.onnx")
    for n in (1, 3):  # the batch dimension is dynamic
        got = runner.run(x[:n])
        assert got.shape == (n, 4)
        assert np.abs(got - ref[:n]).max() <= 1e-4


def test_single_file_opset_and_names(exported):
    import onnx

    out, rows = exported
    e = rows["onnx_fp32"]
    assert not [p.name for p in out.iterdir() if p.suffix == ".data" or ".partial" in p.name]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == e.details["opset"] == 18
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch
    assert e.details["external_data"] is False and e.details["normalization_in_graph"] is True


@pytest.mark.parametrize("name,file", [("onnx_int8_dynamic", "model_int8_dynamic.onnx"),
                                       ("onnx_int8_static", "model_int8_static.onnx")])
def test_int8_variants_run_and_report_agreement(exported, ckpt, samples, name, file):
    out, rows = exported
    e = rows[name]
    assert e.status == "verified" and e.path == file and e.precision == "int8", e.error
    v = e.verification
    assert 0.0 <= v["top1_agreement"] <= 1.0 and v["max_prob_change"] < 0.5 and v["tolerance"] is None
    assert e.size_bytes < 0.5 * rows["onnx_fp32"].size_bytes  # int8 weights really are smaller
    q = e.details["quantization"]
    assert q["mode"] == name.rsplit("_", 1)[1] and q["quantized_node_count"] > 0
    if name.endswith("static"):
        assert "train split" in q["calibration"]
    x = load_batch(samples[0], ckpt.spec)
    assert get_runner("onnxruntime").load(out / file).run(x).shape == (len(x), 4)


def test_manifest_hashes_and_versions(exported):
    out, rows = exported
    manifest = read_manifest(out)["artifacts"]
    for name, e in rows.items():
        assert manifest[name]["sha256"] == e.sha256
        verify_file(out, e)
        assert (out / e.path).stat().st_size == e.size_bytes
        assert {"torch", "onnx", "onnxruntime"} <= set(e.tool_versions)


def test_failed_proof_leaves_no_file(tmp_path, ckpt, monkeypatch):
    def refuse(*a, **k):
        raise xonnx.ExportError("forced mismatch")

    import export.common

    monkeypatch.setattr(export.common, "float_proof", refuse)
    rows = {r.name: r for r in xonnx.export_onnx(ckpt, tmp_path, int8=("dynamic",))}
    assert rows["onnx_fp32"].status == "failed" and "forced mismatch" in rows["onnx_fp32"].error
    assert rows["onnx_int8_dynamic"].status == "failed" and "onnx_fp32" in rows["onnx_int8_dynamic"].error
    assert not list(tmp_path.glob("*.onnx")) and not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    assert read_manifest(tmp_path)["artifacts"]["onnx_fp32"]["status"] == "failed"


def test_cli_bad_checkpoint_exits_2(tmp_path, capsys):
    code = xonnx.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a")])
    assert code == 2 and "missing.pt" in capsys.readouterr().err


def test_an_opset_torch_cannot_write_fails_instead_of_being_recorded(tmp_path, ckpt, samples):
    """torch's exporter writes opset 18 and up: with --opset 17 it kept 18 (a warning lost in its log), and the
    manifest said 17, so a user targeting an older runtime shipped a file it cannot load."""
    rows = {r.name: r for r in xonnx.export_onnx(ckpt, tmp_path, eval_samples=samples[0], int8=(), opset=17)}
    assert rows["onnx_fp32"].status == "failed"
    assert "--opset 17: torch" in rows["onnx_fp32"].error and "wrote opset 18" in rows["onnx_fp32"].error
    assert not list(tmp_path.glob("*.onnx"))
