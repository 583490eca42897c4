"""export.executorch: .pte programs lowered to XNNPACK, run in the ExecuTorch runtime against the float model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("executorch")

import export.executorch as xet  # noqa: E402
from export.manifest import read_manifest, verify_file  # noqa: E402
from export.runners import get_runner  # noqa: E402
from train.data import load_batch, seeded_subset  # noqa: E402

pytestmark = pytest.mark.xdist_group("exports")  # the modules that read conftest's all_formats


@pytest.fixture(scope="module")
def samples(synthetic_index):
    idx = synthetic_index
    return seeded_subset(idx.samples, 4, seed=1), seeded_subset(idx.samples, 8, seed=0)


@pytest.fixture(scope="module")
def exported(format_rows):
    return format_rows("executorch")


def test_fp32_pte_matches_float_model_in_runtime(exported, ckpt, samples):
    out, rows = exported
    e = rows["executorch_fp32"]
    assert e.status == "verified" and e.path == "model.pte" and e.runtime == "executorch", e.error
    assert e.verification["max_abs_logit_diff"] <= 1e-4 and e.verification["passed"]
    assert e.details["xnnpack_delegate_calls"] >= 1
    # everything runs in XNNPACK: nothing falls back to ExecuTorch's portable kernels
    assert e.details["delegation_coverage"] == 1.0 and e.details["ops_outside_delegate"] == []
    assert e.details["delegated_ops"]["aten_convolution_default"] == 20
    x = load_batch(samples[0][:3], ckpt.spec)
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    got = get_runner("executorch", threads=1).load(out / "model.pte").run(x)  # batch 3 runs image by image
    assert got.shape == (3, 4) and np.abs(got - ref).max() <= 1e-4


def test_with_threads_resizes_the_pool_and_loads_the_file_again(exported, ckpt, samples):
    out, _ = exported
    x = load_batch(samples[0][:2], ckpt.spec)
    one = get_runner("executorch", threads=1).load(out / "model.pte")
    first = one.run(x)
    two = one.with_threads(2, out / "model.pte")  # a loaded method keeps the pool size it was loaded with
    assert one.threads == 1 and two.threads == 2 and two.model is not one.model
    np.testing.assert_allclose(two.run(x), first, atol=1e-5)
    assert two.with_threads(1, out / "model.pte").threads == 1


def test_int8_pte_runs_and_reports_agreement(exported, ckpt, samples):
    out, rows = exported
    e = rows["executorch_int8"]
    assert e.status == "verified" and e.path == "model_int8.pte" and e.precision == "int8", e.error
    v = e.verification
    assert 0 <= v["top1_agreement"] <= 1 and v["max_prob_change"] < 0.5 and v["tolerance"] is None
    assert "train split" in e.details["quantization"]["calibration"]
    assert e.details["delegated_ops"]["aten_convolution_default"] == 20
    assert e.details["delegation_coverage"] == 1.0, e.details["ops_outside_delegate"]
    assert e.size_bytes < 0.4 * rows["executorch_fp32"].size_bytes
    got = get_runner("executorch").load(out / "model_int8.pte").run(load_batch(samples[0], ckpt.spec))
    assert got.shape == (4, 4) and np.isfinite(got).all()


def test_manifest_matches_files(exported):
    out, rows = exported
    manifest = read_manifest(out)["artifacts"]
    for name, e in rows.items():
        verify_file(out, e)
        assert manifest[name]["size_bytes"] == (out / e.path).stat().st_size
        assert e.tool_versions["executorch"] != "not installed"


def test_unknown_variant_is_refused(tmp_path, ckpt):
    with pytest.raises(xet.ExportError, match="choose from"):
        xet.export_executorch(ckpt, tmp_path, variants=("fp64",))


def test_etdump_profile_shows_every_operator_inside_the_delegate(exported, tmp_path, capsys):
    """benchmarks.executorch_profile: ExecuTorch's own event tracer (ETDump) read by the devtools Inspector."""
    from benchmarks.executorch_profile import main, run

    out, _ = exported
    result = run(out, runs=3)
    for name in ("executorch_fp32", "executorch_int8"):
        p = result["programs"][name]
        convs = [r for r in p["by_operator"] if r["op"].startswith("Convolution")]
        assert sum(r["count"] for r in convs) == 20 and all(r["in_delegate"] for r in p["by_operator"])
        assert p["ops_outside_delegate"] == [] and 0 < p["delegate_calls_ms"] <= p["forward_ms"]
    assert main(["--artifacts", str(out), "--out", str(tmp_path / "prof"), "--runs", "2"]) == 0
    assert "| Convolution (NHWC, F32)" in (tmp_path / "prof" / "profile.md").read_text()  # kernel family varies by CPU
    assert main(["--artifacts", str(tmp_path), "--runs", "2"]) == 2  # no artifacts.json: an error line
    assert "error:" in capsys.readouterr().err
