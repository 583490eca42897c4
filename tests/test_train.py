"""`python -m train` end to end on tiny SYNTHETIC data: outputs, checkpoints, resume, --skip-bad, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.__main__ import main as train_main
from train.checkpoint import load_checkpoint
from train.loop import TrainError, train_model
from train.model import build_network, imagenet_weights_path
from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = dict(epochs=2, batch_size=8, input_size=32, workers=0, progress=False, weights="none", lr=2e-3)


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


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """6 images per class: the smallest set a stratified train/val/test split accepts for 4 classes."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("small") / "data", per_class=6, size=32, seed=3)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("bad") / "data", per_class=8, size=32, seed=1)
    (root / "Lung_Opacity" / "images" / "synthetic-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_cli_end_to_end_with_imagenet_cache_and_skip_bad(bad_data, tmp_path, monkeypatch):
    """--weights imagenet from a locally made file in TORCH_HOME; --skip-bad leaves the broken file out
    and records it; the run folder holds best/last checkpoints, config, history, splits and the report."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = imagenet_weights_path()
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_network(num_classes=1000).state_dict(), cached)
    out = tmp_path / "run"
    rc = train_main(["--data", str(bad_data), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                     "--input-size", "32", "--workers", "0", "--weights", "imagenet", "--skip-bad",
                     "--no-progress"])
    assert rc == 0
    for name in ("best.pt", "last.pt", "config.json", "history.json", "splits.csv", "train.log",
                 "report/report.md", "report/metrics.json", "report/confusion_matrix.png",
                 "report/roc_curves.png", "report/training_curves.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "finished" and config["train_config"]["weights"] == "imagenet"
    assert [s["path"] for s in config["data"]["skipped_images"]] == [
        str(bad_data / "Lung_Opacity" / "images" / "synthetic-broken.png")]
    assert "synthetic-broken.png" in (out / "train.log").read_text()
    assert config["report"]["split"] == "test"  # generated split has a test part
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    best = load_checkpoint(out / "best.pt")
    assert best.spec.input_size == 32 and best.meta["split_fingerprint"] == config["data"]["split_fingerprint"]
    assert best.meta["best_metric"] == "macro_f1"
    assert best.metrics["macro_f1"] == max(h["val_macro_f1"] for h in history)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["resume"]["epoch"] == 1 and "optimizer" in last["resume"] and len(last["history"]) == 1
    report = (out / "report" / "report.md").read_text()
    assert "SYNTHETIC" in report and "not clinical evidence" in report


def test_resume_continues_exactly(small_data, tmp_path):
    """Stopped after epoch 1 and resumed == trained for 2 epochs in one go."""
    kw = dict(TINY, schedule="onecycle", optimizer="adamw", evaluate=False)
    full = tmp_path / "full"
    train_model(small_data, full, **kw)
    part = tmp_path / "part"
    train_model(small_data, part, stop_after=1, **kw)
    assert json.loads((part / "config.json").read_text())["status"] == "interrupted"
    assert len(json.loads((part / "history.json").read_text())) == 1
    with pytest.raises(TrainError, match="already holds a run"):
        train_model(small_data, part, **kw)
    train_model(small_data, part, resume=True, **kw)
    h_full = json.loads((full / "history.json").read_text())
    h_part = json.loads((part / "history.json").read_text())
    assert [h["epoch"] for h in h_part] == [1, 2]
    for a, b in zip(h_full, h_part):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3, abs=1e-4)
    sa = torch.load(full / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(part / "last.pt", weights_only=True)["state_dict"]
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-3, atol=1e-4), k


def test_a_diverging_run_stops_with_an_error_and_says_failed(small_data, tmp_path):
    """--lr far too high: the val logits turned NaN and scikit-learn's ROC AUC raised a traceback, and
    config.json said 'training' for good."""
    run = tmp_path / "run"
    with pytest.raises(TrainError, match=r"training diverged in epoch 1: the model's outputs on the val images are "
                                         r"not finite .* no checkpoint was saved .* lower --lr \(this run: 10000\)"):
        train_model(small_data, run, **{**TINY, "optimizer": "sgd", "lr": 1e4, "evaluate": False})
    assert json.loads((run / "config.json").read_text())["status"] == "failed"


def test_a_run_stopped_by_ctrl_c_says_interrupted_and_resumes(small_data, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into KeyboardInterrupt) in epoch 2 left 'training' in config.json."""
    import train.loop as loop

    real, calls = loop._train_epoch, []

    def stopped_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_train_epoch", stopped_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_model(small_data, tmp_path / "run", **{**TINY, "evaluate": False})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(loop, "_train_epoch", real)
    train_model(small_data, tmp_path / "run", resume=True, **{**TINY, "evaluate": False})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "finished"


def test_the_run_s_report_plots_every_epoch_not_only_best_pt_s(small_data, tmp_path):
    """The report evaluates best.pt, whose history ends at its own epoch: the curves stopped there, hiding the
    epochs after it (where overfitting shows)."""
    run = tmp_path / "run"
    train_model(small_data, run, **{**TINY, "epochs": 3})
    epochs = [h["epoch"] for h in json.loads((run / "history.json").read_text())]
    plotted = [h["epoch"] for h in json.loads((run / "report" / "metrics.json").read_text())["history"]]
    assert epochs == plotted == [1, 2, 3]


def test_a_run_resumes_on_its_data_moved_to_another_folder(small_data, tmp_path):
    """--resume --data NEW was ignored without a word, so a run whose data folder moved could not go on (the
    error named the old path). The same data under a new path resumes; other data is refused."""
    import shutil

    old = shutil.copytree(small_data, tmp_path / "old")
    kw = dict(TINY, evaluate=False)
    train_model(old, tmp_path / "run", stop_after=1, **kw)
    new = old.rename(tmp_path / "new")
    train_model(new, tmp_path / "run", resume=True, **kw)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "finished" and config["train_config"]["data"] == str(new)
    other = make_synthetic_dataset(tmp_path / "other", per_class=7, size=32, seed=9)  # other files
    train_model(new, tmp_path / "run2", stop_after=1, **kw)
    with pytest.raises(TrainError, match="changed since this run started"):
        train_model(other, tmp_path / "run2", resume=True, **kw)


def test_sampler_balance_and_sgd_cosine_layer4(small_data, tmp_path):
    best = train_model(small_data, tmp_path / "r", **dict(TINY, epochs=1), balance="sampler",
                       optimizer="sgd", schedule="cosine", freeze="layer4", evaluate=False)
    ckpt = load_checkpoint(best)
    assert ckpt.meta["train_config"]["balance"] == "sampler"
    torch.manual_seed(0)  # the run seeds with 0 right before building the network
    init = build_network(num_classes=4).state_dict()
    # --freeze layer4: earlier weights stay at their initialisation, layer4 and the head train
    assert torch.equal(ckpt.state_dict["conv1.weight"], init["conv1.weight"])
    assert torch.equal(ckpt.state_dict["layer3.1.conv2.weight"], init["layer3.1.conv2.weight"])
    assert not torch.equal(ckpt.state_dict["layer4.1.conv2.weight"], init["layer4.1.conv2.weight"])
    assert not torch.equal(ckpt.state_dict["fc.weight"], init["fc.weight"])


def test_resume_without_run_fails(tmp_path, capsys):
    assert train_main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "last.pt does not exist" in capsys.readouterr().err


def test_resume_from_a_folder_without_run_state_fails_naming_the_file(tmp_path, capsys):
    """A last.pt that `python -m train` did not write (here a plain state dict) is refused, not a KeyError."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save(build_network(num_classes=4).state_dict(), run / "last.pt")
    assert train_main(["--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(run / "last.pt") in err and "not the run state" in err and "train_config" in err
    with pytest.raises(TrainError, match="not the run state"):
        train_model(None, run, resume=True, epochs=1)


@pytest.mark.parametrize("flags, said", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--weights", "{tmp}/missing.pt"], "not 'imagenet', 'none' or an existing file"),
    (["--input-size", "8"], "input_size must be at least 16"),
    (["--val-frac", "2"], "--val-frac 2.0"),
    (["--workers", "-1"], "--workers must be 0"),
    (["--stop-after", "0"], "--stop-after must be at least 1 epoch"),  # trained nothing, then said to resume
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA GPU"),  # after the image check, with a train.log
])
def test_a_bad_setting_is_refused_before_the_run_folder_exists(tmp_path, capsys, flags, said):
    run = tmp_path / "run"
    assert train_main(["--out", str(run), *[f.format(tmp=tmp_path) for f in flags]]) == 2
    assert said in capsys.readouterr().err
    assert not run.exists()  # no empty run folder with a train.log left behind


def test_offline_imagenet_weights_fail_before_the_run_folder_exists(synthetic_data, tmp_path, monkeypatch, capsys):
    """--weights imagenet (the default with --data) on a machine without network: the error, with where to put
    the file, comes before the images are checked and leaves no run folder."""
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    run = tmp_path / "run"
    assert train_main(["--data", str(synthetic_data), "--out", str(run), "--weights", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights" in err and str(imagenet_weights_path()) in err and "--weights none" in err
    assert not run.exists()


def test_bad_data_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "error: --data" in r.stderr and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # the mistyped --data left no empty run folder behind


def test_resume_refuses_another_process_count(small_data, tmp_path):
    """The schedule's steps per epoch depend on the process count: resuming with another count is refused
    (it used to overrun OneCycleLR: 'Tried to step 11 times ... total steps is 10')."""
    kw = dict(TINY, schedule="onecycle", optimizer="adamw", evaluate=False)
    train_model(small_data, tmp_path, stop_after=1, **kw)
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert last["resume"]["world_size"] == 1
    last["resume"]["world_size"] = 2  # as if trained by `torchrun --nproc_per_node=2`
    torch.save(last, tmp_path / "last.pt")
    with pytest.raises(TrainError, match="nproc_per_node=2"):
        train_model(small_data, tmp_path, resume=True, **kw)


def test_scaler_state_of_a_cpu_run_does_not_break_a_cuda_resume():
    """A disabled scaler saves {}; an enabled one raises on loading it ('The source state dict is empty')."""
    from train.loop import restore_scaler

    class Scaler:  # the two behaviours of torch.amp.GradScaler that matter here, without needing CUDA
        def __init__(self, enabled):
            self.enabled, self.loaded = enabled, None

        def is_enabled(self):
            return self.enabled

        def load_state_dict(self, state):
            if not state:
                raise RuntimeError("The source state dict is empty, possibly because it was saved from a "
                                   "disabled instance of GradScaler.")
            self.loaded = state

    cpu_state = torch.amp.GradScaler("cuda", enabled=False).state_dict()
    assert cpu_state == {}
    cuda = Scaler(True)
    restore_scaler(cuda, cpu_state)  # CPU run resumed on CUDA: a fresh scaler, no crash
    assert cuda.loaded is None
    restore_scaler(cuda, {"scale": 1024.0})
    assert cuda.loaded == {"scale": 1024.0}
    cpu = Scaler(False)
    restore_scaler(cpu, {"scale": 1024.0})  # CUDA run resumed on CPU: nothing to restore
    assert cpu.loaded is None


def test_global_batch_must_divide_over_the_processes(small_data):
    from train import recipe
    from train.data import assign_splits, discover
    from train.distributed import DistContext
    from train.spec import PreprocessSpec

    idx = assign_splits(discover(small_data))
    cfg = {"batch_size": 8, "balance": "loss", "seed": 0, "workers": 0}
    ctx = DistContext(device=torch.device("cpu"), enabled=True, rank=0, world_size=3)
    with pytest.raises(TrainError, match="multiple of 3, e.g. 9"):
        recipe.make_train_loader(idx, PreprocessSpec(input_size=32), cfg, ctx)
    two = DistContext(device=torch.device("cpu"), enabled=True, rank=0, world_size=2)
    assert recipe.make_train_loader(idx, PreprocessSpec(input_size=32), cfg, two).batch_size == 4


def test_each_rank_draws_its_own_augmentation():
    """Per-rank, per-epoch seeds: rank 0 keeps the single-process stream, other ranks differ, and an epoch
    replays exactly (what --resume relies on)."""
    from train.augment import train_augment
    from train.loop import epoch_seed
    from train.spec import PreprocessSpec

    augment = train_augment(PreprocessSpec(input_size=32))
    image = torch.rand(3, 32, 32)

    def draw(epoch, rank):
        torch.manual_seed(epoch_seed(0, epoch, rank))
        return augment(image)

    assert epoch_seed(0, 3, 0) == 3  # the single-process seed of epoch 3, unchanged
    assert len({epoch_seed(s, e, r) for s in range(3) for e in range(20) for r in range(8)}) == 3 * 20 * 8
    assert torch.equal(draw(1, 0), draw(1, 0)) and torch.equal(draw(1, 1), draw(1, 1))
    assert not torch.equal(draw(1, 0), draw(1, 1)) and not torch.equal(draw(1, 0), draw(2, 0))


def test_a_run_says_when_its_val_split_holds_copies_of_train_images(synthetic_data, tmp_path):
    """A split the user gave with one image filed in train and again in val: the run goes on (the split is the
    user's) but train.log, config.json and the report say so, naming the files."""
    import csv
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    source = sorted((root / "COVID" / "images").glob("*.png"))[1]
    shutil.copyfile(source, source.with_name("filed_again.png"))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for i, p in enumerate(sorted(root.rglob("*.png"))):
            split = "val" if p.name == "filed_again.png" or (p != source and i % 4 == 0) else "train"
            w.writerow([p.relative_to(root), p.parts[len(root.parts)], split])
    out = tmp_path / "run"
    assert train_main(["--data", str(root), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                       "--input-size", "32", "--workers", "0", "--weights", "none", "--no-progress"]) == 0
    found = json.loads((out / "config.json").read_text())["data"]["identical_files"]
    assert found["across_splits"] == 1 and found["conflicting_labels"] == 0
    assert sorted(found["examples_across_splits"][0]) == ["COVID/images/filed_again.png (val)",
                                                          f"COVID/images/{source.name} (train)"]
    assert "1 image(s) are byte-identical files in two splits" in (out / "train.log").read_text()
    assert "1 of these" in (out / "report" / "report.md").read_text()


def test_a_data_folder_with_an_empty_class_is_refused_before_the_weights_are_fetched(tmp_path, monkeypatch, capsys):
    """Offline, the ImageNet weights' error came first and the data's only after the user had fetched them;
    the data's layout is read first now (a fraction of a second), and nothing is left behind."""
    import shutil

    import train.loop

    data = make_synthetic_dataset(tmp_path / "data", per_class=2, size=32)
    shutil.rmtree(data / "Normal")
    (data / "Normal" / "images").mkdir(parents=True)

    def fetch():
        raise AssertionError("fetched the ImageNet weights before reading --data")
    monkeypatch.setattr(train.loop, "fetch_imagenet_weights", fetch)
    out = tmp_path / "run"
    assert train_main(["--data", str(data), "--out", str(out), "--weights", "imagenet"]) == 2
    assert "class 'Normal' has no images" in capsys.readouterr().err and not out.exists()
