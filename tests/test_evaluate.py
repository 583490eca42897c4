"""Evaluation: metric correctness on a hand-checked case, and the report files on a tiny checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from train import evaluate
from train.checkpoint import load_checkpoint
from train.data import discover, load_batch
from train.metrics import classification_metrics

NAMES = ("A", "B", "C")


@pytest.fixture(autouse=True)
def _one_thread_unless_passive():
    """Spinning OpenMP threads on a shared 2-core CPU made these tiny runs ~7x slower (see
    train/__main__.py); `python -m train` sets OMP_WAIT_POLICY=PASSIVE itself, in-process tests cannot."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_metrics_known_case():
    # true:      A A A A B B B C C C ; predicted: A A A B B B A C C A
    y = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 0, 1, 1, 1, 0, 2, 2, 0]
    logits = np.full((10, 3), -2.0, dtype=np.float32)
    logits[np.arange(10), pred] = 2.0
    m = classification_metrics(y, logits, NAMES)
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(0.7)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [1, 0, 2]]
    a, b, c = (m["per_class"][k] for k in NAMES)
    assert (a["precision"], a["recall"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (c["precision"], c["recall"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    f1 = [2 * p * r / (p + r) for p, r in ((3 / 5, 3 / 4), (2 / 3, 2 / 3), (1.0, 2 / 3))]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert [a["support"], b["support"], c["support"]] == [4, 3, 3]
    # class C: its score is high exactly on its 2 hits, low on the 8 others, one of which is a C
    assert c["auc"] == pytest.approx((2 * 7 + 1 * 3.5) / (3 * 7))
    p_true = np.exp(2) / (np.exp(2) + 2 * np.exp(-2))
    p_wrong = np.exp(-2) / (np.exp(2) + 2 * np.exp(-2))
    assert m["loss"] == pytest.approx(-(7 * np.log(p_true) + 3 * np.log(p_wrong)) / 10, rel=1e-6)


def test_macro_f1_averages_the_classes_the_split_has():
    """A split without images of class C: C has no F1; averaged in as 0 it took a third off macro-F1."""
    y = [0, 0, 1, 1]
    logits = np.eye(3, dtype=np.float32)[y] * 5
    m = classification_metrics(y, logits, NAMES)
    assert m["macro_f1"] == 1.0 and m["macro_classes"] == ["A", "B"] and m["per_class"]["C"]["support"] == 0
    md = evaluate.render_markdown({"metrics": m, "spec": {"class_names": NAMES, "input_size": 32, "resize": "bilinear",
                                                          "contrast_stretch": False},
                                   "checkpoint": "c.pt", "checkpoint_sha256": "0" * 64, "data": "d", "split": "val",
                                   "synthetic_data": False, "skipped_images": [], "history": [],
                                   "figures": {"confusion_matrix": "cm.png", "roc": "roc.png"}})
    assert "macro-F1 1.0000 (over the 2 classes with images in this split)" in md


def test_perfect_separation_auc_one():
    y = [0, 1, 2, 0, 1, 2]
    logits = np.eye(3, dtype=np.float32)[y] * 5
    m = classification_metrics(y, logits, NAMES)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["macro_auc"] == 1.0


def test_report_files_and_accuracy(tiny_checkpoint, synthetic_data, tmp_path, monkeypatch):
    out = tmp_path / "report"
    r = evaluate.evaluate_checkpoint(tiny_checkpoint, synthetic_data, split="all", out_dir=out,
                                     explain_per_class=0, progress=False)
    ckpt = load_checkpoint(tiny_checkpoint)
    idx = discover(synthetic_data)
    with torch.no_grad():
        pred = ckpt.build_deploy_model()(torch.from_numpy(load_batch(idx.samples, ckpt.spec))).argmax(1)
    expected = float((pred.numpy() == np.array([s.label for s in idx.samples])).mean())
    assert r["metrics"]["accuracy"] == pytest.approx(expected)
    assert r["metrics"]["n"] == 48
    for f in ("report.md", "metrics.json", "confusion_matrix.png", "roc_curves.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["confusion_matrix"] == r["metrics"]["confusion_matrix"]
    md = (out / "report.md").read_text()
    assert "not clinical evidence" in md and "Viral Pneumonia" in md
    assert "SYNTHETIC" not in md  # these images are not marked as the toolkit's own: a user's data
    assert "## Explanations" not in md  # only with --explain N


def test_a_run_evaluated_on_its_own_folder_keeps_the_synthetic_banner_and_names_the_data(
        tiny_checkpoint, marked_synthetic_data, tmp_path):
    """The demo's data has no split: the run's splits.csv splits it, and the report said the run folder was the
    data and lost the SYNTHETIC banner (read from the run folder's missing README)."""
    from train.checkpoint import make_checkpoint_dict, save_checkpoint
    from train.data import assign_splits, write_splits_csv

    ckpt = load_checkpoint(tiny_checkpoint)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(make_checkpoint_dict(ckpt.state_dict, ckpt.spec, train_config={"data": str(marked_synthetic_data)}),
                    run / "best.pt")
    write_splits_csv(assign_splits(discover(marked_synthetic_data)), run / "splits.csv")
    r = evaluate.evaluate_checkpoint(run / "best.pt", marked_synthetic_data, split="val", out_dir=tmp_path / "r",
                                     progress=False)
    assert r["synthetic_data"] and r["data"] == str(marked_synthetic_data)
    assert r["split_file"] == str(run / "splits.csv")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "are SYNTHETIC" in md and f"as training split it: `{run / 'splits.csv'}`" in md


def test_class_folders_the_model_lacks_are_said_to_be_left_out(tiny_checkpoint, synthetic_data, tmp_path):
    """A model without a class the folder has (a 4-class model on data with a fifth folder): its images cannot be
    scored and were left out without a word; a CSV with that label is refused."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    (root / "Tuberculosis" / "images").mkdir(parents=True)
    for f in sorted((root / "Normal" / "images").iterdir())[:3]:
        shutil.copyfile(f, root / "Tuberculosis" / "images" / f.name)
    r = evaluate.evaluate_checkpoint(tiny_checkpoint, root, split="all", out_dir=tmp_path / "r", progress=False)
    assert r["metrics"]["n"] == 48 and r["unknown_classes"] == {"Tuberculosis": 3}
    assert "Left out: class folder(s) `Tuberculosis` (3 images), not classes of this model" in \
        (tmp_path / "r" / "report.md").read_text()


def test_cli_split_error(tiny_checkpoint, synthetic_data, tmp_path, capsys):
    rc = evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data),
                        "--split", "val", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "has no split column" in capsys.readouterr().err
    rc = evaluate.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(synthetic_data)])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_val_image_that_is_a_train_image_is_said_in_the_report(tiny_checkpoint, synthetic_data, tmp_path):
    """Val metrics are read as 'on unseen images': a report on a split holding copies of train images says
    how many, where the user gave the split (a generated split keeps copies together)."""
    import csv
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    files = sorted(root.rglob("*.png"))
    val = files[::4]
    from PIL import Image

    for i, source in enumerate(files[1:3]):  # two train images filed again, under their class, in val
        copy = source.with_name(f"again_{i}.png")
        shutil.copyfile(source, copy)
        val.append(copy)
    source = files[5]  # and one enlarged and saved as JPEG: the same radiograph, not the same bytes
    gray = Image.open(source).convert("L")
    gray.resize((3 * gray.width, 3 * gray.height), Image.BICUBIC).save(source.with_name("enlarged.jpg"), quality=80)
    val.append(source.with_name("enlarged.jpg"))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for p in sorted([*root.rglob("*.png"), *root.rglob("*.jpg")]):
            w.writerow([p.relative_to(root), p.parts[len(root.parts)], "val" if p in val else "train"])
    for split, said in (("val", True), ("train", False)):
        out = tmp_path / split
        assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(root), "--split", split,
                              "--out", str(out)]) == 0
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["copies_of_train_images"] == (2 if said else 0)
        assert saved["lookalikes_of_train_images"] == (1 if said else 0)
        md = (out / "report.md").read_text()
        assert (f"2 of these {len(val)} val images are byte-identical to images of the train split" in md) == said
        assert (f"1 of these {len(val)} val images look like images of the train split" in md) == said


def test_an_image_washed_out_in_8_bits_is_named_in_the_report(tiny_checkpoint, synthetic_data, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    victim = sorted(root.rglob("*.png"))[5]
    pixels = np.asarray(Image.open(victim).convert("L"), dtype=np.uint16) * 16  # 8-bit values as 12-bit data
    Image.fromarray(pixels).save(victim)
    out = tmp_path / "report"
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(root), "--split", "all",
                          "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())["washed_out_images"]
    assert [w["path"] for w in saved] == [str(victim)] and "12 bits or fewer" in saved[0]["lost"]
    assert f"1 image(s) lost most of their gray levels in the conversion to 8 bits (e.g. `{victim}`" in (
        out / "report.md").read_text()
