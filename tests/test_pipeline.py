"""benchmarks.pipeline: stages in order, a failing stage reported and its dependants skipped, --force."""

from __future__ import annotations

import json

import shutil

import pytest

from benchmarks import pipeline
from benchmarks.pipeline import PartlyFailed, PipelineError, main, run_pipeline


def _fake_stages(monkeypatch, calls: list[str]) -> None:
    def ok(name):
        def fn(ctx):
            calls.append(name)
            return f"{name} done"
        return fn

    def boom(ctx):
        calls.append("export")
        raise RuntimeError("converter exploded")

    def missing(ctx):
        calls.append("quantize")
        raise ImportError("No module named 'quantize.nothing'")

    monkeypatch.setattr(pipeline, "STAGES", [
        ("data", ok("data"), ()), ("train", ok("train"), ("data",)), ("export", boom, ("train",)),
        ("bundle", ok("bundle"), ("export",)), ("quantize", missing, ("train",)),
        ("benchmark", ok("benchmark"), ("export",))])


def test_failed_stage_is_reported_and_dependants_skipped(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    summary = run_pipeline(tmp_path / "demo", progress=False)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"data": "ok", "train": "ok", "export": "failed", "bundle": "skipped",
                      "quantize": "failed", "benchmark": "skipped"}
    assert calls == ["data", "train", "export", "quantize"]
    assert not summary["ok"]
    stages = {s["stage"]: s for s in summary["stages"]}
    assert "converter exploded" in stages["export"]["detail"]
    assert "ImportError: No module named 'quantize.nothing'" in stages["quantize"]["detail"]
    saved = json.loads((tmp_path / "demo" / "pipeline.json").read_text())
    assert saved["stages"] == summary["stages"]
    assert "| export | failed |" in (tmp_path / "demo" / "pipeline.md").read_text()


def test_a_stage_that_partly_failed_is_not_ok_and_its_dependants_still_run(tmp_path, monkeypatch):
    """Every benchmark row failed (the workers could not find a relative --artifacts) and the pipeline still
    said 'all stages ok'. A stage whose items partly failed now says so, and the run is not ok."""
    calls: list[str] = []

    def ok(name):
        return lambda ctx: calls.append(name) or f"{name} done"

    def partly(ctx):
        calls.append("export")
        raise PartlyFailed("18 artifacts written; failed: litert_int8 (converter exploded)")

    monkeypatch.setattr(pipeline, "STAGES", [("data", ok("data"), ()), ("export", partly, ("data",)),
                                             ("benchmark", ok("benchmark"), ("export",))])
    summary = run_pipeline(tmp_path / "demo", progress=False)
    assert calls == ["data", "export", "benchmark"] and not summary["ok"]
    assert [s["status"] for s in summary["stages"]] == ["ok", "partly failed", "ok"]
    md = (tmp_path / "demo" / "pipeline.md").read_text()
    assert "NOT EVERY STAGE RAN OK" in md and "| export | partly failed |" in md and "litert_int8" in md


def test_existing_run_needs_force(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch, [])
    out = tmp_path / "demo"
    (out / "artifacts").mkdir(parents=True)
    (out / "data" / "COVID").mkdir(parents=True)  # a project folder with the user's own data/: not a run's
    (out / "data" / "COVID" / "x.png").write_bytes(b"the user's image")
    (out / "keep.txt").write_text("user file")
    for force in ([], ["--force"]):
        assert main(["--out", str(out), "--quiet", *force]) == 2
        assert "holds data, artifacts, not known to be a pipeline run's" in capsys.readouterr().err
    assert (out / "data" / "COVID" / "x.png").exists()  # --force deleted it
    shutil.rmtree(out / "data")
    (out / "pipeline.json").write_text("{}")  # an earlier run's
    with pytest.raises(PipelineError, match="--force"):
        run_pipeline(out, progress=False)
    assert main(["--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--out", str(out), "--force", "--quiet"]) == 1  # the fake export stage fails
    assert (out / "keep.txt").read_text() == "user file"  # --force removes only the pipeline's outputs
    (out / "pipeline.json").unlink()  # a run stopped before it wrote pipeline.json is known by its marker
    assert main(["--out", str(out), "--force", "--quiet"]) == 1


def test_bad_settings_name_the_flag(tmp_path, capsys):
    with pytest.raises(PipelineError, match="--input-size"):
        run_pipeline(tmp_path / "x", input_size=8, progress=False)
    assert main(["--out", str(tmp_path / "r"), "--runs", "0", "--quiet"]) == 2  # not 2 minutes later, at the end
    assert "--runs >= 1" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["--out", str(tmp_path / "y"), "--formats", "onnx,tflite", "--quiet"]) == 2
    err = capsys.readouterr().err  # the file type a user types names the format that writes it
    assert "--formats tflite: unknown format; did you mean litert (it writes model.tflite, model_int8.tflite)? " \
           "choose from onnx" in err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_whole_pipeline_tiny(tmp_path):
    """Every real stage end to end at 32 px, with three formats (test_export_all exports every format)."""
    summary = run_pipeline(tmp_path / "demo", epochs=1, per_class=12, input_size=32, runs=3, progress=False,
                           formats=("onnx", "lite", "ort"))
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    report = json.loads((tmp_path / "demo" / "reports" / "benchmarks" / "report.json").read_text())
    names = {r["name"] for r in report["rows"]}
    assert {"pytorch_fp32", "ptl_fp32", "onnx_fp32"} <= names
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("ptl_fp32", "onnx_fp32"):
        assert rows[name]["measured"] and rows[name]["top1_agreement"] == 1.0, rows[name].get("reason")
    assert {r["format"] for r in report["rows"] if r["name"] != "pytorch_fp32"} == {"onnx", "lite", "ort"}
    assert (tmp_path / "demo" / "mobile_assets" / "manifest.json").is_file()
