"""`python -m export.inspect`: what a file is and what it carries, checked against the manifest beside it."""

from __future__ import annotations

import json
import shutil

import pytest

from export.inspect import main as inspect_main
from export.onnx import embed_metadata, export_onnx, read_metadata


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, ckpt, export_samples):
    out = tmp_path_factory.mktemp("inspect")
    (row,) = export_onnx(ckpt, out, eval_samples=export_samples[0], int8=())
    assert row.status == "verified"
    return out


def test_inspect_reports_metadata_and_agreement(onnx_dir, ckpt, capsys):
    assert inspect_main([str(onnx_dir / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and str(list(ckpt.spec.class_names)) in out and "agrees with" in out
    assert inspect_main(["--json", str(onnx_dir / "model.onnx")]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["embedded_metadata"]["artifact"] == "onnx_fp32" and info["precision"] == "fp32"
    assert info["summary"]["opsets"]["ai.onnx"] == 18 and info["manifest_checks"][0]["sha256_matches"]


def test_tampered_file_is_reported(onnx_dir, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(onnx_dir, folder)
    meta = read_metadata(folder / "model.onnx")
    embed_metadata(folder / "model.onnx", {**meta, "classes": list(reversed(meta["classes"]))})
    assert inspect_main([str(folder / "model.onnx")]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES" in out and "sha256 differs" in out and "'classes' differs" in out


def test_foreign_truncated_and_unknown_files(onnx_dir, tmp_path, capsys):
    import onnx

    proto = onnx.load(str(onnx_dir / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "theirs.onnx"))
    assert inspect_main([str(tmp_path / "theirs.onnx")]) == 0
    assert "carries no toolkit metadata" in capsys.readouterr().out
    data = (onnx_dir / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    assert inspect_main([str(tmp_path / "cut.onnx")]) == 2
    assert "cut.onnx" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert inspect_main([str(tmp_path / "notes.txt")]) == 2
    assert "unknown kind of file" in capsys.readouterr().err


def test_a_checkpoint_is_told_apart_from_torchscript(tiny_checkpoint, ckpt, tmp_path, capsys):
    """Both are zip archives named .pt: a checkpoint is not reported as 'full TorchScript'."""
    import torch

    assert inspect_main([str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert str(tiny_checkpoint) in err and "not an exported model" in err and "python -m export" in err
    scripted = tmp_path / "theirs.pt"
    torch.jit.script(ckpt.build_deploy_model()).save(str(scripted))
    assert inspect_main([str(scripted)]) == 0
    assert "full TorchScript" in capsys.readouterr().out


def test_a_bundle_or_export_folder_is_told_what_reads_it(onnx_dir, tmp_path, capsys):
    """A folder was 'unknown kind of file'; the two the toolkit writes are named with the command for each."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    assert inspect_main([str(tmp_path / "bundle")]) == 2
    assert f"a Flutter bundle; check it with python -m mobile_assets --check {tmp_path / 'bundle'}" in (
        capsys.readouterr().err)
    assert inspect_main([str(onnx_dir)]) == 2
    assert "an export folder; inspect its model files" in capsys.readouterr().err
