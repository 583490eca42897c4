"""The quantization report on a tiny model: every variant runs in its runtime, the figures in the JSON
are consistent with the saved logits, calibration comes from the train split only, the fallback keeps
the named layers float, the gate sets the exit code, and bad input gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quant_report import ReportError, run_quantization_report
from quantize.torch_ao import QuantizationError, static_int8
from train.data import assign_splits, discover

VARIANTS = {"float": "torch-eager", "torch_dynamic_int8": "torch-eager", "torch_static_int8_qnnpack": "torch-eager",
            "torch_static_int8_x86": "torch-eager", "onnx_fp32": "onnxruntime", "onnx_int8_dynamic": "onnxruntime",
            "onnx_int8_static": "onnxruntime"}


SENS_LAYERS = ["conv1", "layer1.0.conv1", "layer3.0.downsample.0", "fc"]  # a subset keeps the test fast


def _cli(ckpt, data, out, *extra) -> int:
    from quantize.__main__ import main

    return main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--latency-runs", "2",
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_checkpoint, synthetic_data):
    """One full CLI run with both engines, forced sensitivity and a loose gate (so it must exit 0)."""
    out = tmp_path_factory.mktemp("qreport")
    code = _cli(tiny_checkpoint, synthetic_data, out, "--calib-size", "24", "--sensitivity", "--fallback-layers",
                "2", "--sensitivity-layers", ",".join(SENS_LAYERS), "--max-drop", "100", "--cam", "1")
    return json.loads((out / "report.json").read_text()), out, code


def test_every_variant_runs_in_its_runtime(report):
    rep, out, code = report
    assert code == 0 and rep["gate"]["passed"]  # loose budget: exit 0
    assert not torch.is_inference_mode_enabled()  # calibration generators must not leak the mode
    for name, runtime in VARIANTS.items():
        assert rep["variants"][name]["runtime"] == runtime
    assert rep["variants"]["torch_static_int8_qnnpack"]["engine"] == "qnnpack"
    assert rep["variants"]["torch_static_int8_x86"]["engine"] == "x86"
    for f in ("report.md", "report.json", "report.png", "logits.npz", "models/model_int8_static.onnx"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["variants"].keys() == rep["variants"].keys()
    md = (out / "report.md").read_text()
    assert all(name in md for name in VARIANTS) and "Flip matrices" in md


def test_figures_match_the_saved_logits(report):
    rep, out, _ = report
    saved = np.load(out / "logits.npz")
    labels, ref = saved["labels"], saved["float"]
    assert rep["data"]["n_images"] == len(labels)
    for name, v in rep["variants"].items():
        m, logits = v["metrics"], saved[name]
        assert m["top1_agreement"] == pytest.approx((logits.argmax(1) == ref.argmax(1)).mean())
        assert m["accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())
        flips = np.asarray(m["flip_matrix"])
        assert flips.sum() == len(labels) and len(labels) - np.trace(flips) == m["flipped_images"]
        assert m["mean_abs_logit_error"] == pytest.approx(np.abs(logits - ref).mean(), rel=1e-4, abs=1e-7)
        assert v["latency"]["median_ms"] > 0 and v["speedup_vs_float"] > 0
    assert rep["variants"]["float"]["metrics"]["flipped_images"] == 0
    for name, v in rep["variants"].items():  # the paired counts are the accuracy change, image by image
        m, logits = v["metrics"], saved[name]
        pc = m["accuracy_change_paired"]
        assert pc["float_wrong_now_right"] - pc["float_right_now_wrong"] == \
            (logits.argmax(1) == labels).sum() - (ref.argmax(1) == labels).sum()
        lo, hi = m["top1_agreement_ci95"]
        assert lo <= m["top1_agreement"] <= hi
    assert "## How sure these figures are" in (out / "report.md").read_text()


def test_agreement_interval_and_paired_change_match_their_definitions():
    """Clopper-Pearson bounds are beta quantiles (all-agree: (alpha/2)^(1/n)); McNemar's exact p for 5 images
    lost and 1 gained is 2 * P(X <= 1 | 6, 1/2) = 2 * 7/64."""
    from scipy.stats import beta

    from train.metrics import agreement_interval, paired_change

    lo, hi = agreement_interval(818, 819)
    assert lo == pytest.approx(beta.ppf(0.025, 818, 2)) and hi == pytest.approx(beta.ppf(0.975, 819, 1))
    assert agreement_interval(819, 819) == pytest.approx((0.025 ** (1 / 819), 1.0))
    labels = np.zeros(10, dtype=int)
    ref = np.zeros((10, 2)); ref[:6, 0] = 1; ref[6:, 1] = 1      # right on images 0-5
    cand = np.zeros((10, 2)); cand[:1, 0] = 1; cand[1:, 1] = 1   # right on image 0 only ...
    cand[6, 0], cand[6, 1] = 1, 0                               # ... and on image 6
    assert paired_change(labels, ref, cand) == {"float_right_now_wrong": 5, "float_wrong_now_right": 1,
                                                "mcnemar_p": pytest.approx(2 * 7 / 64)}
    assert paired_change(labels, ref, ref)["mcnemar_p"] == 1.0
    from benchmarks.quant_render import _most_flips_clearing  # what the report says a val split can show

    assert _most_flips_clearing(819, 0.995) == 0 and _most_flips_clearing(100, 0.995) is None
    most = _most_flips_clearing(5000, 0.995)
    assert agreement_interval(5000 - most, 5000)[0] >= 0.995 > agreement_interval(5000 - most - 1, 5000)[0]


def test_what_dynamic_modes_touched_is_read_from_the_models(report):
    v = report[0]["variants"]
    assert v["torch_dynamic_int8"]["touched"]["quantized"] == ["net.fc"]  # only the final Linear
    assert v["torch_dynamic_int8"]["size_ratio"] > 0.95
    assert v["onnx_int8_dynamic"]["touched"]["integer_ops"]["ConvInteger"] == 20
    assert v["onnx_int8_dynamic"]["size_ratio"] < 0.3
    assert v["torch_static_int8_x86"]["touched"]["float_weighted_modules"] == []
    assert v["torch_static_int8_x86"]["size_ratio"] < 0.27


def test_cam_comparison_is_appended(report):
    rep, out, _ = report
    assert rep["cam"]["int8_variant"] == "torch_static_int8_qnnpack" and "error" not in rep["cam"]
    assert "CAM" in (out / "report.md").read_text().split("## Gate")[1]
    links = [line.split("](")[1].rstrip(")") for line in (out / "report.md").read_text().splitlines()
             if line.startswith("![float vs int8 heatmaps](")]
    assert links and all((out / link).is_file() for link in links)  # relative to report.md, as viewers read it
    assert all((out / png).is_file() for png in rep["cam"]["pngs"]) and (out / rep["cam"]["grid"]).is_file()


def test_the_report_scores_the_split_every_stage_makes_whatever_the_calibration_seed(synthetic_data):
    """--seed (calibration sampling) also made the val/test split of data without one: with --seed 1 the scored
    'val' images were other images than the ones training and every other stage held out."""
    from benchmarks.quant_report import _split_index

    index, note = _split_index(synthetic_data, None)
    assert note.startswith("generated: stratified seeded split (seed 0)")
    assert {s.path for s in index.split("val")} == {s.path for s in assign_splits(discover(synthetic_data)).split("val")}


def test_calibration_uses_only_the_train_split(report, synthetic_data):
    rep = report[0]
    index = assign_splits(discover(synthetic_data), seed=rep["calibration"]["seed"])
    split_of = {str(s.path): s.split for s in index.samples}
    calib = rep["calibration"]["samples"]
    assert len(calib) == 24 and {split_of[p] for p in calib} == {"train"}
    evaluated = {str(s.path) for s in index.split("val")}
    assert not evaluated & set(calib)
    assert rep["data"]["split_source"].startswith("generated: stratified seeded split")  # the data has no split


def test_sensitivity_fallback_keeps_named_layers_float(report):
    rep = report[0]
    for engine in ("qnnpack", "x86"):
        run = rep["sensitivity"]["runs"][f"torch_static_int8_{engine}"]
        assert sorted(r["layer"] for r in run["ranking"]) == sorted(SENS_LAYERS)
        errors = [r["mean_abs_logit_error"] for r in run["ranking"]]
        assert errors == sorted(errors, reverse=True)
        # --fallback-layers 2 first, then twice as many while a target is still missed
        attempts = run["attempts"]
        assert [len(t["keep_float"]) for t in attempts] == [2, 4][:len(attempts)]
        assert all(t["misses"] for t in attempts[:-1])
        kept = attempts[-1]["keep_float"]
        assert run["keep_float"] == kept == [r["layer"] for r in run["ranking"][:len(kept)]]
        fb = rep["variants"][run["fallback"]]
        assert fb["settings"]["keep_float"] == run["keep_float"]
        assert sorted(fb["touched"]["float_weighted_modules"]) == sorted(f"net.{n}" for n in run["keep_float"])
        assert fb["latency"]["median_ms"] > 0


def test_max_drop_gate_fails_on_a_forced_drop(tmp_path, tiny_checkpoint, synthetic_data, monkeypatch, capsys):
    """Force one variant to predict the wrong class for every image: the gate must exit 1 and name it."""
    from benchmarks import quant_variants as builders

    index = assign_splits(discover(synthetic_data), seed=0)
    wrong = np.eye(4, dtype=np.float32)[[(s.label + 1) % 4 for s in index.split("val")]]
    real_evaluate = builders.evaluate
    monkeypatch.setattr(builders, "evaluate", lambda v, images, **kw: wrong if v.name == "onnx_int8_dynamic"
                        else real_evaluate(v, images, **kw))
    code = _cli(tiny_checkpoint, synthetic_data, tmp_path, "--engines", "x86", "--calib-size", "8",
                "--max-drop", "0.5")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["variants"]["float"]["metrics"]["accuracy"] > 0  # so predicting every image wrong is a drop
    assert code == 1 and not rep["gate"]["passed"]
    err = capsys.readouterr().err
    assert "budget exceeded" in err and "onnx_int8_dynamic: accuracy drops" in err and "recall drops" in err


def _csv_data(tmp_path: Path, synthetic_data: Path, train_classes: set[str]) -> Path:
    idx = discover(synthetic_data)
    rows = ["path,label,split"]
    for i, s in enumerate(idx.samples):
        name = idx.class_names[s.label]
        split = "train" if name in train_classes and i % 3 else "val"
        rows.append(f"{s.path},{name},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


def test_bad_input_errors(tmp_path, tiny_checkpoint, synthetic_data):
    classes = set(discover(synthetic_data).class_names)
    no_train = _csv_data(tmp_path, synthetic_data, set())
    with pytest.raises(QuantizationError, match="no calibration images.*train split"):
        run_quantization_report(tiny_checkpoint, no_train, out_dir=tmp_path / "r", progress=False)
    missing = _csv_data(tmp_path, synthetic_data, classes - {"Normal"})
    with pytest.raises(QuantizationError, match=r"no images of class \['Normal'\].*--calib-size"):
        run_quantization_report(tiny_checkpoint, missing, out_dir=tmp_path / "r", progress=False)
    with pytest.raises(QuantizationError, match="not available in this torch build"):
        run_quantization_report(tiny_checkpoint, synthetic_data, engines=("tpu9",), out_dir=tmp_path / "r")
    with pytest.raises(ReportError, match="--calib-method must be one of"):
        run_quantization_report(tiny_checkpoint, synthetic_data, calib_method="KL", out_dir=tmp_path / "r")
    with pytest.raises(ReportError, match="--split train"):
        run_quantization_report(tiny_checkpoint, synthetic_data, split="train", out_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_untraceable_model_gives_clear_error():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: FX cannot trace it

    with pytest.raises(QuantizationError, match="FX cannot trace"):
        static_int8(Branchy(), [torch.rand(1, 3, 8, 8)], "x86")


def test_cli_rejects_bad_flags(tmp_path, tiny_checkpoint, synthetic_data, capsys):
    assert _cli(tiny_checkpoint, synthetic_data, tmp_path, "--calib-size", "0") == 2
    assert "--calib-size" in capsys.readouterr().err
    assert _cli(tiny_checkpoint, synthetic_data, tmp_path, "--fallback-layers", "0") == 2  # built a 1-layer one
    assert "--fallback-layers must be at least 1, got 0" in capsys.readouterr().err
    assert _cli(tmp_path / "nope.pt", synthetic_data, tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _cli(tiny_checkpoint, synthetic_data, tmp_path, "--reduce-range", "maybe")
    assert exit_.value.code == 2 and "--reduce-range" in capsys.readouterr().err


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def _weight_scales(model) -> torch.Tensor:
    return model.conv.weight().q_per_channel_scales()


def test_avx2_target_halves_the_weight_grid():
    """'avx2' (older spelling 'on') quantizes x86 weights to 7 bits: the same weights get a scale about twice
    as big, and activations keep 8 bits. What that buys depends on this CPU's kernels, detected, not assumed:
    where they do not saturate (VNNI), the lost bit makes 7 bits less precise; where they saturate (AVX2
    without VNNI, or kernels restricted to AVX2), 8 bits lose more to saturation than 7 bits lose to the bit."""
    from quantize.torch_ao import int8_kernels_saturate

    torch.manual_seed(0)
    net = _ConvNet().eval()
    with torch.no_grad():  # positive weights and inputs near full scale: u8 x s8 pairs that overflow int16
        net.conv.weight.uniform_(0.2, 1.0)
        net.conv.bias.zero_()
    calib = [torch.rand(4, 3, 16, 16) for _ in range(3)]
    avx2 = static_int8(net, calib, "x86", reduce_range="avx2")
    vnni = static_int8(net, calib, "x86", reduce_range="vnni")
    ratio = (_weight_scales(avx2) / _weight_scales(vnni)).float()
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=0.02), ratio
    assert avx2.conv.scale == vnni.conv.scale  # activations: 8 bits either way
    assert torch.equal(_weight_scales(static_int8(net, calib, "x86", reduce_range="on")), _weight_scales(avx2))
    assert int(avx2.conv.weight().int_repr().abs().max()) <= 64
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        ref = net(x)
        err7, err8 = (avx2(x) - ref).abs().mean(), (vnni(x) - ref).abs().mean()
    if int8_kernels_saturate("x86"):
        assert err7 < err8, (err7, err8)
    else:
        assert err8 < err7, (err7, err8)


def test_x86_target_auto_follows_the_kernels(monkeypatch):
    from quantize import torch_ao

    for saturates in (True, False):
        monkeypatch.setattr(torch_ao, "int8_kernels_saturate", lambda engine="x86", s=saturates: s)
        for engine in ("x86", "fbgemm", "onednn"):
            assert torch_ao.weight_reduce_range(engine) is saturates
        assert torch_ao.weight_reduce_range("qnnpack") is False
        assert torch_ao.qconfig_description("x86")["weight_reduce_range"] == str(saturates).lower()
        assert torch_ao.resolve_x86_isa("auto", "torch") == ("avx2" if saturates else "vnni")
    assert torch_ao.weight_reduce_range("x86", "on") is True and torch_ao.weight_reduce_range("x86", "vnni") is False
    assert torch_ao.weight_reduce_range("qnnpack", "avx2") is False  # phones never reduce
    with pytest.raises(QuantizationError, match="--x86-isa must be one of"):
        torch_ao.weight_reduce_range("x86", "sometimes")


def test_report_records_the_activation_range(report):
    from quantize.torch_ao import cpu_has_vnni, int8_kernels_saturate

    rep, out, _ = report
    assert rep["calibration"]["reduce_range"] == "auto" and rep["calibration"]["cpu_has_vnni"] == cpu_has_vnni()
    x86 = rep["variants"]["torch_static_int8_x86"]["settings"]
    assert x86["weight_reduce_range"] == str(int8_kernels_saturate("x86")).lower()
    ort = rep["variants"]["onnx_int8_static"]["settings"]
    assert ort["reduce_range"] is (rep["calibration"]["x86_isa"]["onnxruntime"] == "avx2")
    assert rep["machine"]["cpu_model"] and "int8_flags" in rep["machine"]
    assert rep["variants"]["torch_static_int8_qnnpack"]["settings"]["weight_reduce_range"] == "false"
    assert "x86: activations HistogramObserver" in (out / "report.md").read_text()


def test_fallback_is_triggered_by_low_agreement_as_well_as_drop():
    from benchmarks.quant_report import _misses

    within = {"accuracy_change_points": 0.0, "top1_agreement": 0.999,
              "per_class": {"A": {"recall_change_points": 0.0}}}
    assert _misses(within, (0.3, 1.0)) == []
    assert "agreement 99.39%" in _misses({**within, "top1_agreement": 0.9939}, (0.3, 1.0))[0]
    one_image = {**within, "per_class": {"A": {"recall_change_points": -0.44}}}
    assert _misses(one_image, (0.3, 1.0)) == []  # the target allows a class to lose up to 1 recall point
    assert "recall points" in _misses(one_image, (0.3, 0.3))[0]  # --max-drop 0.3 applies to classes too


def test_engine_rows_time_the_file_reloaded_under_that_engine(report):
    """An int8 model loaded from TorchScript under another engine computes the same outputs."""
    from benchmarks.quant_variants import loaded_under

    timing = report[0]["timing"]["all"]
    assert timing["torch_static_int8_qnnpack@x86"]["median_ms"] > 0
    assert timing["torch_static_int8_x86@qnnpack"]["median_ms"] > 0
    under = report[0]["variants"]["torch_static_int8_qnnpack"]["speedup_vs_float_loaded_under"]
    assert under["x86"] == pytest.approx(timing["float"]["median_ms"] / timing["torch_static_int8_qnnpack@x86"]["median_ms"])
    assert "loaded under x86" in (report[1] / "report.md").read_text()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = static_int8(_ConvNet().eval(), [torch.randn(4, 3, 16, 16) for _ in range(3)], "qnnpack")
    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with torch.no_grad():
            expected = model(x)
        reloaded = loaded_under(model, "x86", x)
        assert torch.backends.quantized.engine == "qnnpack"  # the caller's engine is restored
        torch.backends.quantized.engine = "x86"
        with torch.no_grad():
            got = reloaded(x)
    finally:
        torch.backends.quantized.engine = before
    assert torch.allclose(got, expected, atol=0.05)
