"""export.coreml: every variant is written, read back, and its weights rebuilt and checked (CoreML cannot
predict on Linux); metadata and class labels travel inside the package."""

from __future__ import annotations

import copy
import json
import platform

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

import export.coreml as xcm  # noqa: E402
from export.coreml_verify import LABEL, METHOD, read_program, verify_package  # noqa: E402
from export.manifest import read_manifest, verify_file  # noqa: E402
from export.registry import variant  # noqa: E402
from train.data import discover, seeded_subset  # noqa: E402

pytestmark = pytest.mark.xdist_group("exports")  # the modules that read conftest's all_formats


@pytest.fixture(scope="module")
def eval_samples(synthetic_data, ckpt):
    return seeded_subset(discover(synthetic_data, ckpt.spec.class_names).samples, 4, seed=1)


@pytest.fixture(scope="module")
def exported(format_rows):
    return format_rows("coreml")


@pytest.mark.parametrize("variant_name", list(xcm.VARIANTS))
def test_each_variant_written_and_verified_by_reconstruction(exported, variant_name):
    out, rows = exported
    v = variant(f"coreml_{variant_name}")
    name, file, precision = v.name, v.file, v.precision
    e = rows[name]
    if platform.system() != "Darwin":  # CoreML cannot run here: checked, never 'verified'
        assert e.status == "exported" and "not executed" in e.status_reason, e.error
    else:
        assert e.status == "verified", e.error
    assert e.path == file and (out / file).is_dir() and (out / file / "Manifest.json").is_file()
    assert e.runtime == "coreml" and e.precision == precision
    v = e.verification
    if platform.system() != "Darwin":
        assert v["method"] == METHOD and v["label"] == LABEL and v["executed"] is False
    assert v["weights"]["weights_within_bound"] and v["weights"]["tensors_checked"] == 42  # 21 conv/linear x (w, b)
    assert v["drift_estimate"]["execution"].startswith("PyTorch CPU, float16")
    assert v["n_images"] == 4 and 0 <= v["top1_agreement"] <= 1
    verify_file(out, e)
    assert e.size_bytes == sum(p.stat().st_size for p in (out / file).rglob("*") if p.is_file())


def test_compression_is_real_and_errors_ordered(exported):
    _, rows = exported
    w = {k: rows[f"coreml_{k}"].verification["weights"] for k in xcm.VARIANTS}
    assert set(w["fp16"]["storage_kinds"]) == {"const"}
    assert w["w8"]["storage_kinds"]["constexpr_affine_dequantize"] == 20  # every conv; fc is under the threshold
    assert w["palette4"]["storage_kinds"]["constexpr_lut_to_dense"] == 20
    err = {k: w[k]["max_rel_weight_error"] for k in w}
    assert err["fp16"] < 1e-3 < err["palette4"] and err["w8"] < 0.005 and err["palette6"] < err["palette4"]
    size = {k: rows[f"coreml_{k}"].size_bytes for k in xcm.VARIANTS}
    assert size["palette4"] < size["palette6"] < size["w8"] < 0.6 * size["fp16"]


def test_metadata_classes_and_image_input(exported, ckpt):
    import coremltools as ct

    out, rows = exported
    model = ct.models.MLModel(str(out / rows["coreml_fp16"].path), skip_model_load=True)
    meta = model.user_defined_metadata
    assert json.loads(meta["classes"]) == list(ckpt.spec.class_names)
    assert json.loads(meta["preprocessing"]) == ckpt.spec.to_dict()
    assert meta["source_checkpoint_sha256"] == ckpt.sha256
    assert model.short_description and model.license and model.version.endswith(ckpt.sha256[:12])
    desc = model.get_spec().description
    assert desc.input[0].name == "image" and desc.input[0].type.WhichOneof("Type") == "imageType"
    assert desc.input[0].type.imageType.width == ckpt.spec.input_size
    assert desc.predictedFeatureName == "classLabel" and "logits" in [o.name for o in desc.output]


def test_int8_weights_rebuilt_independently_match_pytorch(exported, ckpt):
    """Dequantize the w8 package by hand ((q - zero_point) * scale) and compare with the BN-folded weights."""
    out, rows = exported
    _, prog = read_program(out / rows["coreml_w8"].path)
    ops = [op for op in prog.functions["main"].operations if op.op_type == "conv"]
    graph = xcm.CoreMLGraph(ckpt.build_deploy_model())
    convs = [m for _, m in graph.weight_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(ops) == len(convs) == 20
    for op, conv in zip(ops, convs):
        q = op.weight.op
        assert q.op_type == "constexpr_affine_dequantize"
        scale = np.asarray(q.scale.val, dtype=np.float32).reshape(-1, 1, 1, 1)
        zp = np.asarray(q.zero_point.val, dtype=np.float32).reshape(-1, 1, 1, 1)
        w = (q.quantized_data.val.astype(np.float32) - zp) * scale
        ref = conv.weight.detach().numpy()
        assert np.abs(w - ref).max() <= 0.5 * scale.max() * 1.01 + 1e-3 * np.abs(ref).max()


def test_tampered_source_fails_verification(exported, ckpt):
    """The check has teeth: against weights that are not the package's source, verification refuses."""
    out, rows = exported
    graph = copy.deepcopy(xcm.CoreMLGraph(ckpt.build_deploy_model()))
    with torch.no_grad():
        graph.weight_modules()[5][1].weight.add_(0.05)
    x = np.repeat(np.full((1, 1, 32, 32), 0.5, np.float32), 3, axis=1)
    with pytest.raises(xcm.ExportError, match="error bound"):
        verify_package(out / rows["coreml_fp16"].path, graph, ckpt.spec, "fp16", x, np.zeros((1, 4)), "t", None)


def test_on_macos_coreml_s_own_predict_is_held_to_the_estimate(exported, ckpt, eval_samples, monkeypatch):
    """On a Mac the package runs in CoreML: its predict was recorded but held to nothing, and the entry kept the
    Linux estimate's figures, so a package that predicts wrongly was 'verified' with good-looking numbers. (Linux
    cannot run CoreML: macOS and its runner are stood in for, with the float model's logits as CoreML's.)"""
    import export.coreml_verify as cv
    import export.runners as runners
    from export.common import eval_inputs, reference_logits

    out, rows = exported
    inputs = eval_inputs(ckpt, eval_samples)
    ref = reference_logits(ckpt, inputs.x)

    class CoreMLGiving:
        def __init__(self, logits):
            self.logits = logits

        def load(self, path):
            return self

        def run(self, x):
            return self.logits

    monkeypatch.setattr(cv.platform, "system", lambda: "Darwin")
    graph = xcm.CoreMLGraph(ckpt.build_deploy_model())
    package = out / rows["coreml_fp16"].path
    monkeypatch.setattr(runners, "get_runner", lambda name, **kw: CoreMLGiving(ref + 1e-3))
    v = verify_package(package, graph, ckpt.spec, "fp16", inputs.x, ref, inputs, None)
    assert v["executed"] and v["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-3) and v["top1_agreement"] == 1.0
    monkeypatch.setattr(runners, "get_runner", lambda name, **kw: CoreMLGiving(-ref))  # every top class wrong
    with pytest.raises(xcm.ExportError, match="CoreML's predict agrees with the float model's top class on 0.000"):
        verify_package(package, graph, ckpt.spec, "fp16", inputs.x, ref, inputs, None)


def test_missing_library_is_a_failed_row(tmp_path, ckpt, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_coremltools(name, *a, **k):
        if name == "coremltools" or name.startswith("coremltools."):
            raise ImportError("No module named 'coremltools'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    rows = xcm.export_coreml(ckpt, tmp_path, variants=("fp16", "w8"))
    assert [r.status for r in rows] == ["failed", "failed"] and "coremltools is not installed" in rows[0].error
    assert read_manifest(tmp_path)["artifacts"]["coreml_w8"]["status"] == "failed"


def test_float16_emulation_agrees_with_real_float16(ckpt, eval_samples):
    """The drift check's float16 emulation (float32 compute on float16-rounded values, float32 speed) against
    PyTorch's real float16 execution: they differ from each other less than float16 differs from float32."""
    from export.coreml_verify import run_float16
    from train.data import load_batch

    graph = xcm.CoreMLGraph(ckpt.build_deploy_model())
    x = load_batch(eval_samples, ckpt.spec)
    with torch.inference_mode():
        ref = graph(torch.from_numpy(x))[1].numpy()
    emulated, real = run_float16(graph, x), run_float16(graph, x, emulated=False)
    drift = np.abs(real - ref).max()
    assert np.abs(emulated - ref).max() > 0  # it does round: not the float32 model again
    assert np.abs(emulated - real).max() <= max(drift, 1e-3)
    assert (emulated.argmax(1) == real.argmax(1)).all()
