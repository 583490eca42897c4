"""export.torchscript / `python -m export.lite`: every .ptl is proven in the lite interpreter; failures leave no file behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import export.lite.__main__ as lite_cli
import export.torchscript as lite
from export.manifest import entries, read_manifest, verify_file
from export.runners import get_runner
from train.checkpoint import make_checkpoint_dict, save_checkpoint
from train.data import load_batch, seeded_subset


@pytest.fixture(scope="module")
def samples(synthetic_index):
    idx = synthetic_index
    return seeded_subset(idx.samples, 16, seed=0), seeded_subset(idx.samples, 8, seed=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt, samples):
    out = tmp_path_factory.mktemp("artifacts")
    calib, verify = samples
    result = lite.export_lite(ckpt, out, eval_samples=verify, calib_samples=calib, int8="static", engine="qnnpack")
    return out, {e.name: e for e in result}, verify


def _no_partials(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial" in p.name]


def test_float_ptl_matches_eager_in_lite_interpreter(exported, ckpt):
    out, by_name, verify = exported
    e = by_name["ptl_fp32"]
    assert e.status == "verified" and e.path == "model.ptl" and e.runtime == "pytorch-lite"
    x = load_batch(verify, ckpt.spec)
    got = get_runner("pytorch-lite").load(out / "model.ptl").run(x)
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    assert got.shape == (len(verify), 4)
    assert np.abs(got - ref).max() <= 1e-4
    assert e.verification["max_abs_logit_diff"] <= 1e-4 and e.verification["inputs_origin"] == "real"
    assert e.details["conversion"] == "script"
    assert e.details["bytecode_version"] == max(lite.bytecode_versions())
    assert "aten::conv2d" in e.details["operators"] or any("conv" in op for op in e.details["operators"])
    # BatchNorm folded into the convolutions by freezing (what optimize_for_mobile would do, without XNNPACK)
    assert e.details["fold_and_freeze"]["status"] == "applied" and e.details["fold_and_freeze"]["batch_norm_left"] == 0
    assert not any("batch_norm" in op for op in e.details["operators"])
    verify_file(out, e)  # sha256 in artifacts.json matches the file


def test_int8_ptl_small_runs_and_records_engine(exported, ckpt):
    out, by_name, verify = exported
    e = by_name["ptl_int8"]
    assert e.status == "verified" and e.engine == "qnnpack" and e.precision == "int8"
    assert e.details["recommended_runtime_engine"] == "qnnpack"
    assert (out / "model_int8.ptl").stat().st_size < 0.35 * (out / "model.ptl").stat().st_size
    assert 0.0 <= e.verification["top1_agreement"] <= 1.0 and "max_prob_change" in e.verification
    previous = torch.backends.quantized.engine
    try:
        got = get_runner("pytorch-lite", engine="qnnpack").load(out / "model_int8.ptl").run(
            load_batch(verify, ckpt.spec))
    finally:
        torch.backends.quantized.engine = previous
    assert got.shape == (len(verify), 4) and np.isfinite(got).all()
    assert "train split" in e.details["calibration"]


def test_optimize_for_mobile_status_recorded(exported):
    _, by_name, _ = exported
    for name in ("ptl_fp32", "ptl_int8"):
        ofm = by_name[name].details["optimize_for_mobile"]
        assert ofm["status"] in ("applied", "not applied")
        if ofm["status"] == "not applied":
            assert ofm["reason"]


def test_optimize_for_mobile_failure_is_recorded_not_raised(monkeypatch):
    import torch.utils.mobile_optimizer as mo

    def boom(module):
        raise RuntimeError("Mobile optimization only available with XNNPACK. XNNPACK is not enabled.")

    monkeypatch.setattr(mo, "optimize_for_mobile", boom)
    module, status = lite.try_optimize_for_mobile(torch.jit.script(nn.Linear(2, 2)))
    assert module is None and status["status"] == "not applied" and "XNNPACK" in status["reason"]


def test_bytecode_backport_writes_requested_version(tmp_path, ckpt):
    from torch.jit.mobile import _get_model_bytecode_version

    older = max(v for v in lite.bytecode_versions() if v < max(lite.bytecode_versions()))
    (e,) = lite.export_lite(ckpt, tmp_path, int8="none", bytecode_version=older)
    assert e.status == "exported" and "GENERATED" in e.status_reason, e.error  # no --data: numerics only
    assert _get_model_bytecode_version(str(tmp_path / "model.ptl")) == older == e.details["bytecode_version"]
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    got = get_runner("pytorch-lite").load(tmp_path / "model.ptl").run(x)
    ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("version", [0, 99])
def test_impossible_bytecode_version_is_a_clear_error(tmp_path, ckpt, version):
    with pytest.raises(lite.ExportError, match=r"can backport to \[.*\]"):
        lite.export_lite(ckpt, tmp_path, int8="none", bytecode_version=version)
    assert not list(tmp_path.iterdir())


def test_failed_proof_leaves_no_artifact(tmp_path, ckpt, monkeypatch):
    (tmp_path / "model.ptl").write_bytes(b"stale model from an earlier run")
    import export.common

    # the lite interpreter answers with logits far from the model's: simulates a mismatching export
    monkeypatch.setattr(export.common, "run_artifact", lambda name, path, x, engine=None: np.full((len(x), 4), 99.0))
    (e,) = lite.export_lite(ckpt, tmp_path, int8="none")
    assert e.status == "failed" and "differ" in e.error and e.path is None
    assert not (tmp_path / "model.ptl").exists() and not _no_partials(tmp_path)
    assert read_manifest(tmp_path)["artifacts"]["ptl_fp32"]["status"] == "failed"


def test_interrupted_export_leaves_no_half_file(tmp_path, ckpt, monkeypatch):
    real_save = lite.save_ptl

    def save_then_die(module, dest, bytecode_version, meta=None):
        real_save(module, dest, bytecode_version, meta)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the bytes hit the disk, before the proof

    monkeypatch.setattr(lite, "save_ptl", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        lite.export_lite(ckpt, tmp_path, int8="none")
    assert not (tmp_path / "model.ptl").exists() and not _no_partials(tmp_path)


def test_script_or_trace_falls_back_to_trace():
    class Unscriptable(nn.Module):
        def forward(self, x):
            return x * float(np.float32(2.0))  # numpy call: torch.jit.script cannot compile it

    module, method = lite.script_or_trace(Unscriptable(), torch.ones(1, 3))
    assert method == "trace" and torch.equal(module(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    assert lite.script_or_trace(nn.Linear(3, 2), torch.ones(1, 3))[1] == "script"


def test_export_torchscript_full_torchscript(tmp_path, ckpt):
    (e,) = lite.export_torchscript(ckpt, tmp_path)
    assert e.status == "exported" and e.verification["inputs_origin"] == "generated" and e.runtime == "torchscript" and e.path == "model.torchscript.pt"
    assert e.verification["max_abs_logit_diff"] <= 1e-4
    assert [x.name for x in entries(tmp_path)] == ["torchscript_fp32"]
    # the folded convolution weights keep channels-last order in the file (train.model.channels_last)
    module = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    weights = [n.output().toIValue() for n in module.graph.nodes()
               if n.kind() == "prim::Constant" and n.output().type().kind() == "TensorType"]
    weights = [w for w in weights if w.dim() == 4 and w.shape[-1] > 1]
    assert len(weights) == 17 and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_latest_checkpoint_discovery(tmp_path, tiny_checkpoint, caplog):
    runs = tmp_path / "runs"
    for name, age in (("old", 100), ("new", 0)):
        (runs / name).mkdir(parents=True)
        p = runs / name / "best.pt"
        p.write_bytes(tiny_checkpoint.read_bytes())
        os.utime(p, (time.time() - age, time.time() - age))
    with caplog.at_level("INFO"):
        assert lite_cli._resolve_checkpoint(None, runs) == runs / "new" / "best.pt"
    assert "new/best.pt" in caplog.text
    assert lite_cli._resolve_checkpoint("given.pt", runs) == Path("given.pt")


def test_cli_without_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert lite_cli.main(["--no-bundle"]) == 2
    assert "python -m train" in capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert lite_cli.main(["--checkpoint", str(tmp_path / "nope.pt"), "--no-bundle"]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert lite_cli.main(["--checkpoint", str(bad), "--no-bundle"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_cli_class_count_mismatch(tmp_path, ckpt, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(ckpt.state_dict, plain)  # a torchvision state dict: 4 outputs, no class names
    assert lite_cli.main(["--checkpoint", str(plain), "--classes", "a", "b", "c", "--no-bundle"]) == 2
    assert "4 outputs but there are 3 class names" in capsys.readouterr().err


def test_cli_bad_bytecode_version_before_any_work(tmp_path, tiny_checkpoint, capsys):
    code = lite_cli.main(["--checkpoint", str(tiny_checkpoint), "--bytecode-version", "2",
                      "--artifacts", str(tmp_path / "a"), "--no-bundle"])
    assert code == 2 and "--bytecode-version 2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_unwritable_artifacts_folder(tmp_path, tiny_checkpoint, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = lite_cli.main(["--checkpoint", str(tiny_checkpoint), "--artifacts", str(blocker / "artifacts"), "--no-bundle",
                      "--int8", "none"])
    assert code == 2 and "--artifacts" in capsys.readouterr().err


def test_toolkit_checkpoint_with_other_spec_is_refused(tmp_path, tiny_spec, capsys):
    from train.model import build_network

    net = build_network(num_classes=4)
    p = tmp_path / "c.pt"
    save_checkpoint(make_checkpoint_dict(net.state_dict(), tiny_spec), p)
    assert lite_cli.main(["--checkpoint", str(p), "--classes", "w", "x", "y", "z", "--no-bundle"]) == 2
    assert "do not pass a different one" in capsys.readouterr().err
