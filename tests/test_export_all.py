"""export.formats / `python -m export`: the registry, and export_all turning each failure into a row."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest

import export.formats as formats
from export.__main__ import main as export_main
from export.manifest import ArtifactEntry, read_manifest, record, verify_file
from train.atomic import sha256_file, size_bytes
from train.data import seeded_subset

FIXED_NAMES = {"ptl_fp32", "ptl_int8", "torchscript_fp32", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static",
               "coreml_fp16", "coreml_w8", "coreml_palette6", "coreml_palette4", "executorch_fp32",
               "executorch_int8", "torchserve_mar"}


@pytest.fixture(scope="module")
def samples(synthetic_index):
    idx = synthetic_index
    return seeded_subset(idx.samples, 4, seed=1), seeded_subset(idx.samples, 8, seed=0)


def test_registry_covers_every_artifact_and_resolves():
    assert {n for f in formats.FORMATS.values() for n in f.entries} == FIXED_NAMES
    for f in formats.FORMATS.values():
        assert f.suffix.startswith(".") and f.description and f.name in formats.FORMATS
        module = importlib.import_module(f.module)  # light: heavy libraries load inside the exporters
        assert callable(getattr(module, f.function)), f"{f.module}.{f.function}"


def test_forced_failure_is_a_row_and_the_others_still_export(tmp_path, ckpt, samples, monkeypatch):
    import export.coreml

    def boom(*a, **k):
        raise RuntimeError("forced failure for the test")

    monkeypatch.setattr(export.coreml, "export_coreml", boom)
    rows = formats.export_all(ckpt, tmp_path, eval_samples=samples[0], calib_samples=samples[1],
                              only=["onnx", "coreml", "torchscript"], options={"onnx": {"int8": ("dynamic",)}})
    by = {r.name: r for r in rows}
    assert set(by) == {"onnx_fp32", "onnx_int8_dynamic", "coreml_fp16", "coreml_w8", "coreml_palette6",
                       "coreml_palette4", "torchscript_fp32"}
    for name in ("coreml_fp16", "coreml_w8", "coreml_palette6", "coreml_palette4"):
        assert by[name].status == "failed" and "forced failure" in by[name].error and by[name].path is None
    for name in ("onnx_fp32", "onnx_int8_dynamic", "torchscript_fp32"):
        assert by[name].status == "verified", by[name].error
    manifest = read_manifest(tmp_path)["artifacts"]
    assert set(manifest) == set(by)
    for name, e in manifest.items():
        if e["status"] != "failed":
            path = verify_file(tmp_path, ArtifactEntry(**e))
            assert e["sha256"] == sha256_file(path) and e["size_bytes"] == size_bytes(path)
    config = json.loads((tmp_path / "export_config.json").read_text())
    assert config["results"]["coreml_w8"] == "failed" and config["checkpoint_sha256"] == ckpt.sha256


def _fake_module(fail: bool):
    def exporter(ckpt, out_dir, *, eval_samples=None, calib_samples=None, **_):
        if fail:
            raise ValueError("library exploded")
        rows = []
        for name in _entries_of[exporter]:
            (Path(out_dir) / f"{name}.bin").write_bytes(name.encode())
            e = ArtifactEntry(name=name, format="fake", precision="fp32", runtime="torch-eager", path=f"{name}.bin",
                              status="verified", sha256=sha256_file(Path(out_dir) / f"{name}.bin"),
                              size_bytes=len(name))
            record(out_dir, e)
            rows.append(e)
        return rows
    return exporter


_entries_of: dict = {}


def test_every_registered_format_becomes_rows(tmp_path, ckpt, monkeypatch):
    """With stub exporters (one raising, one whose module is missing), every entry of every format is recorded."""
    fakes = {}
    for f in formats.FORMATS.values():
        fn = _fake_module(fail=f.name == "executorch")
        _entries_of[fn] = f.entries
        fakes.setdefault(f.module, types.SimpleNamespace()).__dict__[f.function] = fn

    def fake_import(name):
        if name == "export.mar":
            raise ImportError("No module named 'export.mar'")
        return fakes[name]

    monkeypatch.setattr(formats.importlib, "import_module", fake_import)
    rows = {r.name: r for r in formats.export_all(ckpt, tmp_path)}
    assert set(rows) == FIXED_NAMES == set(read_manifest(tmp_path)["artifacts"])
    assert "library exploded" in rows["executorch_int8"].error and rows["executorch_fp32"].status == "failed"
    assert "export.mar.export_mar is not available" in rows["torchserve_mar"].error
    assert rows["torchserve_mar"].runtime == "torchserve" and rows["executorch_int8"].precision == "int8"
    assert all(rows[n].status == "verified" for n in FIXED_NAMES - {"executorch_fp32", "executorch_int8",
                                                                     "torchserve_mar"})


def test_cli_rejects_unknown_format(capsys):
    assert export_main(["--checkpoint", "x.pt", "--formats", "onnx,tflite"]) == 2
    assert "tflite" in capsys.readouterr().err


def test_cli_exports_selected_format(tmp_path, tiny_checkpoint, capsys):
    code = export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--formats", "torchscript"])
    out = capsys.readouterr().out
    assert code == 0 and "torchscript_fp32" in out
    row = read_manifest(tmp_path)["artifacts"]["torchscript_fp32"]
    assert row["status"] == "exported" and "GENERATED" in row["status_reason"]  # no --data: a numerics check
