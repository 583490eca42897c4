"""The checkpoint format: round trip, weights_only loading, the three accepted layouts, convert CLI,
and the ImageNet weights path (never touching the network)."""

from __future__ import annotations

import shutil
import urllib.error

import pytest
import torch

from train import convert
from train.checkpoint import CheckpointError, load_checkpoint, make_checkpoint_dict, save_checkpoint
from train.model import WeightsError, build_network, imagenet_weights_path, init_weights
from train.spec import PreprocessSpec


@pytest.fixture(scope="module")
def x32():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out(ckpt, x):
    with torch.no_grad():
        return ckpt.build_deploy_model()(x)


def test_round_trip_weights_only(tiny_checkpoint, tiny_spec, x32):
    raw = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert raw["format"] == "cxr-toolkit-checkpoint" and raw["spec"]["input_size"] == 32
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.spec == tiny_spec and ckpt.source_format == "cxr-toolkit-checkpoint"
    again = tmp = tiny_checkpoint.parent / "again.pt"
    save_checkpoint(make_checkpoint_dict(ckpt.state_dict, ckpt.spec), tmp)
    assert torch.equal(_out(load_checkpoint(again), x32), _out(ckpt, x32))


def test_foreign_formats_give_same_model(tiny_checkpoint, tiny_spec, tmp_path, x32):
    state = load_checkpoint(tiny_checkpoint).state_dict
    plain, notebook = tmp_path / "plain.pt", tmp_path / "notebook.pt"
    torch.save(state, plain)
    torch.save({"model_state_dict": {f"resnet18.{k}": v for k, v in state.items()}, "epoch": 3}, notebook)
    ref = _out(load_checkpoint(tiny_checkpoint), x32)
    # torch.compile's and DDP's wrappers prefix every key (refused before: "no ResNet-18 weights found"); a
    # Lightning module's state dict holds its network under an attribute, beside other modules' tensors
    wrapped = {"compiled.pt": {f"_orig_mod.{k}": v for k, v in state.items()},
               "ddp_compiled.pt": {f"module._orig_mod.{k}": v for k, v in state.items()},
               "lightning.pt": {"state_dict": {**{f"net.{k}": v for k, v in state.items()},
                                               "criterion.weight": torch.ones(4)}, "epoch": 3}}
    for name, content in wrapped.items():
        torch.save(content, tmp_path / name)
    for path, fmt in ((plain, "torchvision_state_dict"), (notebook, "notebook"),
                      *((tmp_path / name, "notebook") for name in wrapped)):
        ckpt = load_checkpoint(path, tiny_spec)
        assert ckpt.source_format == fmt, path.name
        assert torch.equal(_out(ckpt, x32), ref), path.name


def test_class_count_mismatch(tiny_checkpoint, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint(tiny_checkpoint).state_dict, plain)
    spec3 = PreprocessSpec(class_names=("a", "b", "c"), input_size=32)
    with pytest.raises(CheckpointError, match="4 outputs but there are 3 class names.*python -m train.convert "
                                              "--weights .*plain.pt --out runs/imported/best.pt --classes NAME"):
        load_checkpoint(plain, spec3)


def test_convert_cli(tiny_checkpoint, tmp_path, x32, capsys):
    state = load_checkpoint(tiny_checkpoint).state_dict
    src = tmp_path / "notebook.pt"
    torch.save({"model_state_dict": {f"resnet18.{k}": v for k, v in state.items()}}, src)
    out = tmp_path / "converted" / "best.pt"
    assert convert.main(["--weights", str(src), "--out", str(out), "--size", "32",
                         "--classes", "A", "B", "C", "D", "--std", "0.5", "0.5", "0.5"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.spec.class_names == ("A", "B", "C", "D") and ckpt.spec.std == (0.5, 0.5, 0.5)
    assert ckpt.meta["converted_from"]["format"] == "notebook"
    assert torch.equal(ckpt.build_network()(x32 * 2), load_checkpoint(tiny_checkpoint).build_network()(x32 * 2))
    bad = tmp_path / "bad.pt"
    assert convert.main(["--weights", str(src), "--out", str(bad), "--classes", "A", "B"]) == 2
    assert "4 outputs but there are 2 class names" in capsys.readouterr().err
    assert not bad.exists()


def test_imagenet_weights_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = imagenet_weights_path()
    assert str(cached).startswith(str(tmp_path))
    torch.manual_seed(0)
    fake = build_network(num_classes=1000).state_dict()  # a locally made stand-in for the real file
    cached.parent.mkdir(parents=True)
    torch.save(fake, cached)
    net = build_network(num_classes=4)
    init_weights(net, "imagenet")
    assert torch.equal(net.conv1.weight, fake["conv1.weight"])
    assert net.fc.weight.shape == (4, 512)  # own head kept


class _Payload:
    """A pickled object that creates a folder when unpickled: proof of whether a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_imagenet_cache_file_is_read_weights_only(tmp_path, monkeypatch):
    """A file put in torchvision's cache by hand (what the offline message asks for) is never unpickled:
    torchvision's own loader would run it with weights_only=False."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = imagenet_weights_path()
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "unpickled"
    torch.save({"conv1.weight": _Payload(marker)}, cached)
    with pytest.raises(CheckpointError) as err:
        init_weights(build_network(num_classes=4), "imagenet")
    assert not marker.exists()
    assert str(cached) in str(err.value) and "pickled Python objects" in str(err.value)


def test_a_pickled_model_is_refused_with_what_to_save_instead(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(build_network(num_classes=4), path)  # torch.save(model): the usual mistake
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "torch.save(model.state_dict(), PATH)" in msg and "ResNet" in msg
    assert "weights_only` set to `False" not in msg and "\x1b" not in msg  # none of torch's unsafe advice


def test_imagenet_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        init_weights(build_network(num_classes=4), "imagenet")
    msg = str(err.value)
    assert str(imagenet_weights_path()) in msg and "--weights none" in msg and "TORCH_HOME" in msg


def test_local_weights_path_and_bad_path(tiny_checkpoint, tmp_path):
    net = build_network(num_classes=4)
    init_weights(net, str(tiny_checkpoint))
    assert torch.equal(net.conv1.weight, load_checkpoint(tiny_checkpoint).state_dict["conv1.weight"])
    with pytest.raises(WeightsError, match="not 'imagenet', 'none' or an existing file"):
        init_weights(net, str(tmp_path / "missing.pt"))


def test_a_dropout_then_linear_head_reads_as_the_linear_head(tiny_checkpoint, tiny_spec, tmp_path, x32):
    """`fc = nn.Sequential(nn.Dropout(p), nn.Linear(512, classes))` is one Linear layer at inference (refused
    before: 'no ResNet-18 weights found'); a head with two weighted layers is refused naming them."""
    state = load_checkpoint(tiny_checkpoint).state_dict
    dropout_head = {k.replace("fc.", "fc.1.", 1) if k.startswith("fc.") else k: v for k, v in state.items()}
    torch.save(dropout_head, tmp_path / "dropout_head.pt")
    assert torch.equal(_out(load_checkpoint(tmp_path / "dropout_head.pt", tiny_spec), x32),
                       _out(load_checkpoint(tiny_checkpoint), x32))
    # ... saved from DataParallel, or as a notebook's attribute (refused before: the prefix was found by fc.weight)
    torch.save({f"module.{k}": v for k, v in dropout_head.items()}, tmp_path / "dp_dropout_head.pt")
    torch.save({"model_state_dict": {f"resnet18.{k}": v for k, v in dropout_head.items()}},
               tmp_path / "notebook_dropout_head.pt")
    for name in ("dp_dropout_head.pt", "notebook_dropout_head.pt"):
        assert torch.equal(_out(load_checkpoint(tmp_path / name, tiny_spec), x32),
                           _out(load_checkpoint(tiny_checkpoint), x32))
    mlp_head = {k: v for k, v in state.items() if not k.startswith("fc.")}
    mlp_head.update({"fc.0.weight": torch.zeros(256, 512), "fc.0.bias": torch.zeros(256),
                     "fc.3.weight": torch.zeros(4, 256), "fc.3.bias": torch.zeros(4)})
    torch.save(mlp_head, tmp_path / "mlp_head.pt")
    with pytest.raises(CheckpointError, match=r"the head `fc` has 2 layers with weights \(fc.0.weight, fc.3.weight\)"):
        load_checkpoint(tmp_path / "mlp_head.pt", tiny_spec)


def test_a_network_trained_on_one_gray_channel_exports_as_the_same_function(tmp_path, x32):
    """`conv1 = nn.Conv2d(1, 64, ...)`, how many X-ray notebooks train: every export failed with torch's 'size
    mismatch for conv1.weight' per format. With the one mean/std its training used it is the same function on the
    three gray channels the toolkit feeds; with per-channel values stated it is refused naming the fix."""
    torch.manual_seed(0)
    gray_net = build_network(num_classes=4)
    gray_net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    gray_net.eval()
    path = tmp_path / "gray.pt"
    torch.save(gray_net.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, PreprocessSpec(input_size=32))  # ImageNet's per-channel mean/std
    assert str(path) in str(err.value) and "conv1 reads 1 channel" in str(err.value)
    assert "python -m train.convert" in str(err.value) and "--mean" in str(err.value)

    out = tmp_path / "converted" / "best.pt"
    assert convert.main(["--weights", str(path), "--out", str(out), "--size", "32",
                         "--mean", "0.5", "--std", "0.25"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.spec.mean == (0.5,) * 3 and ckpt.spec.std == (0.25,) * 3
    gray = x32[:, :1]
    with torch.no_grad():
        want = gray_net((gray - 0.5) / 0.25)
        got = ckpt.build_deploy_model()(gray.expand(-1, 3, -1, -1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    net = build_network(num_classes=4)  # fine-tuning from it starts from the same stem
    init_weights(net, str(path))
    torch.testing.assert_close(net.conv1.weight.sum(1), gray_net.conv1.weight[:, 0])


def test_convert_takes_one_or_three_values_for_mean_and_std(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert.main(["--weights", str(tiny_checkpoint), "--out", str(tmp_path / "x.pt"), "--mean", "0.5", "0.4"])
    assert "--mean takes 3 values (one per RGB channel) or 1" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_exported_models_and_torchscript_archives_are_refused_with_what_to_pass(tmp_path):
    """A TorchScript file (torch.jit.save) gave torch's own advice to load it with weights_only=False, cut off
    mid-word; an exported model was 'not a file torch.save wrote (Unsupported operand 8)'."""
    scripted = tmp_path / "model_scripted.pt"
    torch.jit.save(torch.jit.script(build_network(num_classes=4).eval()), scripted)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(scripted)
    msg = str(err.value)
    assert str(scripted) in msg and "TorchScript archive" in msg and "torch.save(model.state_dict()" in msg
    assert "weights_only` set to `False" not in msg
    for name, kind in (("model.onnx", "an ONNX model"), ("model.tflite", "a LiteRT model"),
                       ("model.pte", "an ExecuTorch program")):
        (tmp_path / name).write_bytes(b"\x08\x07not weights")
        with pytest.raises(CheckpointError, match=f"is {kind}, an exported model, not weights"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "model.mlpackage").mkdir()
    with pytest.raises(CheckpointError, match="a CoreML package, an exported model"):
        load_checkpoint(tmp_path / "model.mlpackage")


def test_safetensors_weights_are_read(tiny_checkpoint, tiny_spec, tmp_path, x32):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = load_checkpoint(tiny_checkpoint).state_dict
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert torch.equal(_out(load_checkpoint(path, tiny_spec), x32), _out(load_checkpoint(tiny_checkpoint), x32))


def test_the_training_data_is_split_as_training_split_it(tiny_checkpoint, synthetic_data, tmp_path, caplog):
    """A run trained with --seed 3 on a folder without a split: `--data FOLDER` made the split again with seed 0,
    so the export verified on images the model trained on and calibrated int8 on val images. The run's
    splits.csv is the split now, wherever a command splits the data the checkpoint was trained on."""
    import logging

    from benchmarks.run import load_eval_set
    from export.cli import resolve_data
    from train.data import assign_splits, discover, verification_sets, write_splits_csv

    ckpt = load_checkpoint(tiny_checkpoint)
    run = tmp_path / "run"
    run.mkdir()
    config = {"data": str(synthetic_data), "seed": 3, "val_frac": 0.15, "test_frac": 0.15}
    save_checkpoint(make_checkpoint_dict(ckpt.state_dict, ckpt.spec, train_config=config), run / "best.pt")
    trained_split = assign_splits(discover(synthetic_data), seed=3)
    write_splits_csv(trained_split, run / "splits.csv")
    where = {s.path: s.split for s in trained_split.samples}
    run_ckpt = load_checkpoint(run / "best.pt")

    data = resolve_data(synthetic_data, run_ckpt, True, "static int8", "")
    assert data == run / "splits.csv"
    verify, calib = verification_sets(data, ckpt.spec.class_names, 300, 100)
    assert {where[s.path] for s in verify} == {"val"} and {where[s.path] for s in calib} == {"train"}
    images, labels, _ = load_eval_set(run_ckpt, synthetic_data, "val", None)  # the benchmark scores the same val
    assert len(labels) == len(trained_split.split("val"))
    from train.evaluate import evaluate_checkpoint  # and the evaluation, which refused a folder without a split

    report = evaluate_checkpoint(run / "best.pt", synthetic_data, split="test", out_dir=tmp_path / "eval",
                                 progress=False)
    assert report["metrics"]["n"] == len(trained_split.split("test"))

    other = tmp_path / "other"
    shutil.copytree(synthetic_data, other)
    assert resolve_data(other, run_ckpt, True, "static int8", "") == other  # other data: split as it is
    (run / "splits.csv").unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_data(synthetic_data, run_ckpt, True, "static int8", "") == synthetic_data
    assert "the run's splits.csv is gone" in caplog.text and "seed 3" in caplog.text
