"""Heatmaps, shortcut audit and float-vs-int8 comparison on a tiny 64 px model and synthetic data."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import load_checkpoint, make_checkpoint_dict, save_checkpoint
from train.data import Sample, discover
from train.explain.audit import mass_shares, pearson, source_baseline, top_iou
from train.model import build_network
from train.spec import PreprocessSpec
from train.synthetic import make_synthetic_dataset

SIZE = 64  # layer4 is 2x2 here: the smallest size where a heatmap has any spatial structure


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_network(num_classes=4)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, SIZE, SIZE))
    path = tmp_path_factory.mktemp("ckpt64") / "tiny64.pt"
    save_checkpoint(make_checkpoint_dict(net.state_dict(), PreprocessSpec(input_size=SIZE)), path)
    return path


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    """Synthetic images plus a labels.csv with split, source and cohort, as cxr4 has."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn64") / "data", per_class=6, size=SIZE, seed=1)
    rows = []
    for c in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted((c / "images").iterdir())):
            src = "siteA" if c.name in ("COVID", "Normal") else f"site-{c.name}"
            rows.append([f.relative_to(root).as_posix(), c.name, "train" if i < 3 else "val", src,
                         "pediatric" if c.name == "Viral Pneumonia" else ""])
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split", "source", "cohort"], *rows])
    return root


def test_border_mass_all_border_and_all_centre():
    cam = np.zeros((64, 64))
    cam[:8, :] = cam[-8:, :] = cam[:, :8] = cam[:, -8:] = 1.0
    assert mass_shares(cam)["border"] == pytest.approx(1.0)
    assert mass_shares(cam)["centre"] == pytest.approx(0.0)
    centre = np.zeros((64, 64))
    centre[8:-8, 8:-8] = 1.0
    assert mass_shares(centre)["border"] == pytest.approx(0.0)
    corners = np.zeros((64, 64))
    corners[:8, :8] = 1.0
    assert mass_shares(corners)["corners"] == pytest.approx(1.0)
    assert mass_shares(np.zeros((64, 64)))["border"] is None


def test_iou_and_pearson():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    assert top_iou(a, a) == 1.0 and pearson(a, a) == pytest.approx(1.0)
    left, right = np.zeros((32, 32)), np.zeros((32, 32))
    left[:, :8], right[:, -8:] = 1.0, 1.0
    assert top_iou(left, right) == 0.0
    assert pearson(a, np.ones((32, 32))) is None


def test_source_baseline_is_perfect_when_source_is_class():
    train = [Sample(Path(f"t{i}"), i % 3, "train", f"src{i % 3}") for i in range(30)]
    val = [Sample(Path(f"v{i}"), i % 3, "val", f"src{i % 3}") for i in range(12)]
    assert source_baseline(train, val)["accuracy"] == 1.0
    mixed = [Sample(Path(f"m{i}"), i % 3, "val", "one-source") for i in range(12)]
    assert source_baseline(train, mixed)["accuracy"] == pytest.approx(1 / 3)


def test_float_package_and_hook_path_agree(ckpt64, data64):
    """The int8 comparison relies on the hook path computing the same maps as the grad-cam package."""
    from train.data import load_batch
    from train.explain.maps import float_cams, hooked_cams

    ckpt = load_checkpoint(ckpt64)
    x = torch.from_numpy(load_batch(discover(data64).samples[:6], ckpt.spec))
    targets = [0, 1, 2, 3, 0, 1]
    pkg = float_cams(ckpt.build_deploy_model(), x, targets, progress=False)
    hook, _, _ = hooked_cams(ckpt.build_deploy_model(), x, targets, progress=False)
    for m in ("gradcam", "eigencam"):
        assert pkg[m].shape == (6, SIZE, SIZE)
        np.testing.assert_allclose(pkg[m], hook[m], atol=1e-5)


def test_cli_report_with_int8(ckpt64, data64, tmp_path):
    from train.explain.__main__ import main

    out = tmp_path / "explain"
    assert main(["--checkpoint", str(ckpt64), "--data", str(data64), "--per-class", "2", "--out", str(out),
                 "--int8", "--calib-size", "8", "--no-progress"]) == 0
    report = json.loads((out / "explain.json").read_text())
    expl = report["explanations"]
    assert len(expl["images"]) == 8 and (out / "roc.png").is_file()
    for m in ("gradcam", "eigencam"):
        assert (out / expl["grids"][m]).is_file()
        for row in expl["images"]:
            assert (out / row[m]["png"]).is_file()
            shares = [row[m][k] for k in ("border", "centre") if row[m][k] is not None]
            assert all(0.0 <= v <= 1.0 for v in shares)
    audit = expl["source_audit"]
    assert set(audit["per_source"]) == {"siteA", "site-Lung_Opacity", "site-Viral_Pneumonia"} or \
        set(audit["per_source"]) == {"siteA", "site-Lung_Opacity", "site-Viral Pneumonia"}
    assert audit["baseline"]["accuracy"] == pytest.approx(0.75)  # siteA mixes two classes 50/50
    assert audit["baseline"]["fit_on"] == "train split"
    assert expl["cohort_audit"]["per_cohort"]["pediatric"]["classes"]["Viral Pneumonia"] == 3
    q = report["int8"]
    assert 0.0 <= q["overall"]["gradcam"]["iou_top20"] <= 1.0
    assert max(q["method_check_max_abs_diff"].values()) < 1e-5
    assert (out / q["grid"]).is_file() and all((out / p).is_file() for p in q["pngs"])
    md = (out / "explain.md").read_text()
    assert "roc.png" in md and "cannot show" in md and "int8" in md


def test_bad_checkpoint_is_reported(tmp_path, data64, capsys):
    from train.explain.__main__ import main

    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data64), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data64), "--int8", "--calib-size", "0",
                 "--out", str(tmp_path / "x")]) == 2  # named first, not after the float work as a data problem
    assert "--calib-size must be at least 1, got 0" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_write_explanations_without_sources(tiny_checkpoint, synthetic_data, tmp_path):
    """train.evaluate's call: folder data (no split, no source) and a 32 px model (1x1 heatmaps)."""
    from train.explain.run import write_explanations

    ckpt = load_checkpoint(tiny_checkpoint)
    index = discover(synthetic_data, ckpt.spec.class_names)
    md, info = write_explanations(ckpt, index, index.samples[::4], tmp_path, per_class=1, progress=False)
    assert info["source_audit"] is None and info["cohort_audit"] is None
    assert len(info["images"]) == 4 and all((tmp_path / r["gradcam"]["png"]).is_file() for r in info["images"])
    assert "no source" in md and "](cam/gradcam_grid.png)" in md
    json.dumps(info)


def test_compare_with_dynamic_int8(ckpt64, data64, tmp_path):
    """Dynamic int8 quantizes only fc: heatmaps may move a little, the hook path must still work."""
    from quantize.cam_compare import compare_float_int8
    from quantize.variants import make_int8_model

    ckpt = load_checkpoint(ckpt64)
    qmodel = make_int8_model(ckpt, "dynamic", progress=False)
    md, info = compare_float_int8(ckpt, qmodel, discover(data64).split("val"), tmp_path, per_class=1,
                                  progress=False)
    assert len(info["images"]) == 4 and info["top1_agreement"] is not None
    assert info["overall"]["eigencam"]["iou_top20"] == pytest.approx(1.0)  # convs untouched by dynamic int8
    assert info["eigencam_sign_aligned"] == 0 and "Method for int8" in md and json.dumps(info)


def test_data_without_a_split_is_explained_on_the_split_every_stage_uses(tiny_checkpoint, synthetic_data,
                                                                          tmp_path, caplog):
    """Folder data names no split: the report explains images of the seeded val split that training,
    the benchmark and the quantization report read, and the log says the split was made."""
    from train.data import labelled_splits
    from train.explain.run import run_explain

    ckpt = load_checkpoint(tiny_checkpoint)
    with caplog.at_level(logging.WARNING, logger="train.explain.run"):
        report = run_explain(tiny_checkpoint, synthetic_data, per_class=1, out_dir=tmp_path, progress=False)
    val = {str(s.path) for s in labelled_splits(synthetic_data, ckpt.spec.class_names).split("val")}
    shown = {r["path"] for r in report["explanations"]["images"]}
    assert shown and shown <= val
    assert "names no split" in caplog.text
