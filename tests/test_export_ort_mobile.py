"""export.ort_mobile: batch-1 files that ONNX Runtime runs, in ORT format with the reduced-build operator config,
and the mobile checker's verdicts (the registry-parametrized test in test_export_all covers the common contract)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import export.ort_mobile as om
from export.onnx import write_onnx
from export.runners import get_runner
from train.data import load_batch


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt, export_samples):
    out = tmp_path_factory.mktemp("ortmobile")
    rows = om.export_ort(ckpt, out, eval_samples=export_samples[0], calib_samples=export_samples[1])
    return out, {r.name: r for r in rows}


def test_batch_is_fixed_at_one_and_a_larger_batch_runs_image_by_image(exported, ckpt, export_samples):
    out, rows = exported
    assert [rows[n].status for n in ("ort_mobile_fp32", "ort_fp32", "ort_mobile_int8", "ort_int8")] == ["verified"] * 4
    shape = [d.dim_value for d in onnx.load(str(out / "model_mobile.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 32, 32]
    x = load_batch(export_samples[0], ckpt.spec)
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    for file in ("model_mobile.onnx", "model.ort"):
        runner = get_runner("onnxruntime").load(out / file)
        assert runner.model.get_inputs()[0].shape == [1, 3, 32, 32]
        assert np.abs(runner.run(x) - ref).max() <= 1e-4  # 4 images, one at a time
    assert (out / "model_int8.ort").stat().st_size < 0.3 * (out / "model.ort").stat().st_size
    assert om.describe(out / "model.ort")["format"] == "ORT (flatbuffer)"  # the bundled .onnx files were called so
    assert om.describe(out / "model_mobile.onnx")["format"].startswith("ONNX (protobuf)")


def test_ort_files_come_with_the_operator_config_and_their_own_verdicts(exported):
    out, rows = exported
    config = (out / om.CONFIG_FILE).read_text()
    assert "ai.onnx;" in config and "QLinearConv" in config  # the int8 file's fused kernels are listed
    assert rows["ort_int8"].details["ort_format"]["reduced_build_config"] == om.CONFIG_FILE
    fixed = rows["ort_mobile_fp32"].details["mobile_usability"]["nnapi"]
    assert fixed["supported_nodes"] == fixed["nodes"] and fixed["should_perform_well"] == "YES"
    fused = rows["ort_fp32"].details["mobile_usability"]["nnapi"]  # CPU-fused graph: NNAPI cannot take FusedConv
    assert fused["supported_nodes"] < fused["nodes"] and "com.microsoft:FusedConv" in fused["unsupported_ops"]
    assert rows["ort_int8"].details["quantization"]["calibration"].startswith("8 images from the train split")
    int8 = rows["ort_mobile_int8"].details  # the stem rewritten for CPU kernels is whole again: NNAPI takes it all
    assert int8["quantization"]["stem_undone"] and int8["quantization"]["stem"] is None
    assert int8["mobile_usability"]["nnapi"]["unsupported_ops"] == [] and int8["mobile_usability"]["nnapi"]["partitions"] == 1


def test_the_checker_sees_what_the_issue_measured_on_the_dynamic_file(tmp_path, ckpt):
    """ONNX Runtime's mobile checker: a dynamic batch leaves NNAPI nothing, the fixed batch everything."""
    dynamic, fixed = tmp_path / "dynamic.onnx", tmp_path / "fixed.onnx"
    write_onnx(ckpt.build_deploy_model(), ckpt.spec, dynamic)
    om.fix_batch(dynamic, fixed)
    before, after = om.mobile_usability(dynamic)["nnapi"], om.mobile_usability(fixed)["nnapi"]
    assert before["supported_nodes"] == 0 and before["should_perform_well"] == "NO"
    assert after["supported_nodes"] == after["nodes"] > 0 and after["should_perform_well"] == "YES"


def test_int8_without_real_calibration_images_is_refused(tmp_path, ckpt, export_samples):
    from export.common import ExportError

    with pytest.raises(ExportError, match="real"):
        om.export_ort(ckpt, tmp_path, eval_samples=export_samples[0], calib_samples=None)
    assert not list(tmp_path.iterdir())
    rows = om.export_ort(ckpt, tmp_path, eval_samples=export_samples[0], variants=("fp32",))
    assert [r.name for r in rows] == ["ort_mobile_fp32", "ort_fp32"]


def test_ort_profile_shows_the_graph_onnx_runtime_runs(exported, tmp_path):
    """benchmarks.ort_profile: ORT's own profiler; every file runs its 20 convolutions (fused or int8)."""
    from benchmarks.ort_profile import main, run

    out, _ = exported
    result = run(out, runs=2)
    assert set(result["files"]) == {"ort_mobile_fp32", "ort_fp32", "ort_mobile_int8", "ort_int8"}
    for name, p in result["files"].items():
        convs = {r["op"]: r["nodes"] for r in p["by_operator"] if "Conv" in r["op"]}
        assert sum(convs.values()) == 20 and p["run_ms"] > 0, (name, convs)
        if "int8" in name:
            assert set(convs) == {"QLinearConv"}  # ORT fused the QDQ pairs into int8 kernels
    assert main(["--artifacts", str(out), "--out", str(tmp_path / "prof"), "--runs", "2"]) == 0
    assert "| QLinearConv | 20 |" in (tmp_path / "prof" / "profile.md").read_text()


def test_ort_profile_names_a_missing_file(exported, tmp_path, capsys):
    """A file artifacts.json lists but the folder lost: ONNX Runtime's raw NoSuchFile traceback before."""
    import shutil

    from benchmarks.ort_profile import main

    out = shutil.copytree(exported[0], tmp_path / "art")
    (out / "model.ort").unlink()
    assert main(["--artifacts", str(out), "--out", str(tmp_path / "prof"), "--runs", "1"]) == 2
    assert "model.ort is missing; export it again" in capsys.readouterr().err


def test_reuses_this_exports_onnx_files_when_they_are_the_same_recipe(tmp_path, ckpt, export_samples,
                                                                        synthetic_data):
    """After `python -m export`'s onnx format, the mobile int8 is model_int8_static.onnx with its batch fixed:
    the same integers, no second calibration. A fresh folder quantizes on its own."""
    from export.onnx import export_onnx

    export_onnx(ckpt, tmp_path, eval_samples=export_samples[0], calib_samples=export_samples[1])
    rows = {r.name: r for r in om.export_ort(ckpt, tmp_path, eval_samples=export_samples[0],
                                             calib_samples=export_samples[1])}
    assert rows["ort_int8"].details["quantization"]["reused"].startswith("model_int8_static.onnx")
    assert rows["ort_fp32"].details["float_source"] == "model.onnx of this export"
    x = load_batch(export_samples[0], ckpt.spec)
    same = get_runner("onnxruntime").load(tmp_path / "model_int8_static.onnx").run(x)
    assert np.array_equal(get_runner("onnxruntime").load(tmp_path / "model_int8_mobile.onnx").run(x), same)
    # as many calibration images, other ones (another --data): calibrated here, not reused as 'the same images'
    from train.data import labelled_splits

    calibrated = {s.path for s in export_samples[1]}
    others = [s for s in labelled_splits(synthetic_data, ckpt.spec.class_names).split("train")
              if s.path not in calibrated][:len(calibrated)]
    assert len(others) == len(calibrated)
    rows = {r.name: r for r in om.export_ort(ckpt, tmp_path, eval_samples=export_samples[0], calib_samples=others,
                                             variants=("int8",))}
    assert "reused" not in rows["ort_int8"].details["quantization"], rows["ort_int8"].details["quantization"]


def test_a_fresh_folder_quantizes_itself(exported):
    _, rows = exported
    assert "reused" not in rows["ort_int8"].details["quantization"]
    assert rows["ort_fp32"].details["float_source"] == "exported here"
