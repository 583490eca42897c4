"""'verified' means real images: no static int8 from noise, statuses that say what was checked, the CPU
recorded with every check, x86 int8 that cannot saturate, and one `error:` line for every bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.common import status_for
from export.manifest import ArtifactEntry, read_manifest, record
from train.checkpoint import make_checkpoint_dict, save_checkpoint
from train.data import discover, seeded_subset

REPO = Path(__file__).resolve().parents[1]


def _run_main(main, argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


# --------------------------------------------------------------------------- no static int8 without real images
@pytest.mark.parametrize("module, extra, alternative", [
    ("export.onnx", [], "--int8 dynamic"),
    ("export.executorch", [], "--variants fp32"),
    ("export", ["--formats", "onnx,lite"], "--int8 dynamic"),
])
def test_static_int8_without_data_stops_before_writing(module, extra, alternative, tmp_path, tiny_checkpoint, capsys):
    import importlib

    main = importlib.import_module(module + ("" if module != "export" else ".__main__")).main
    out = tmp_path / "out"
    code, err = _run_main(main, ["--checkpoint", str(tiny_checkpoint), "--out", str(out), *extra], capsys)
    assert code == 2 and err.startswith("error:") and "--data" in err and alternative in err, err
    assert not (out / "artifacts.json").exists() and not any(out.glob("*")) if out.exists() else True


def test_lite_static_without_data_stops(tmp_path, tiny_checkpoint, capsys):
    from export.lite.__main__ import main

    code, err = _run_main(main, ["--checkpoint", str(tiny_checkpoint), "--artifacts", str(tmp_path / "a"),
                                 "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--data" in err and "--int8 dynamic" in err
    assert not (tmp_path / "a" / "artifacts.json").exists()


def test_float_only_without_data_is_exported_not_verified(tmp_path, tiny_checkpoint, capsys):
    from export.__main__ import main

    code = main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--formats", "onnx,torchscript",
                 "--int8", "none"])
    assert code == 0
    rows = read_manifest(tmp_path)["artifacts"]
    assert set(rows) == {"onnx_fp32", "torchscript_fp32"}
    for e in rows.values():
        assert e["status"] == "exported" and "GENERATED" in e["status_reason"], e
        assert e["verification"]["inputs_origin"] == "generated" and e["verification"]["max_abs_logit_diff"] <= 1e-4
    assert "not 'verified'" in capsys.readouterr().out


def test_checkpoint_with_recorded_data_calibrates_on_it(tmp_path, tiny_spec, synthetic_data, capsys):
    """A toolkit checkpoint that records the data it was trained on needs no --data for static int8."""
    from export.onnx import main
    from train.model import build_network

    ckpt_path = tmp_path / "run" / "best.pt"
    net = build_network(num_classes=tiny_spec.num_classes)
    save_checkpoint(make_checkpoint_dict(net.state_dict(), tiny_spec, train_config={"data": str(synthetic_data)}),
                    ckpt_path)
    code = main(["--checkpoint", str(ckpt_path), "--out", str(tmp_path / "out"), "--int8", "static",
                 "--calib-size", "8", "--eval-size", "4"])
    assert code == 0, capsys.readouterr().err
    e = read_manifest(tmp_path / "out")["artifacts"]["onnx_int8_static"]
    assert e["status"] == "verified" and e["details"]["quantization"]["calibration"].startswith("8 images")


def test_marked_synthetic_data_is_never_verified(tmp_path, ckpt, marked_synthetic_data):
    from export.onnx import export_onnx
    from train.data import assign_splits

    idx = assign_splits(discover(marked_synthetic_data, ckpt.spec.class_names))
    rows = export_onnx(ckpt, tmp_path, eval_samples=seeded_subset(idx.split("val"), 4),
                       calib_samples=seeded_subset(idx.split("train"), 8), int8=("static",))
    assert [r.status for r in rows] == ["exported", "exported"]
    assert all("SYNTHETIC" in r.status_reason and r.verification["inputs_origin"] == "synthetic" for r in rows)
    assert "SYNTHETIC" in rows[1].details["quantization"]["calibration"]


def test_library_call_without_calibration_is_a_failed_row_not_noise(tmp_path, ckpt):
    from export.pipeline import export_all

    rows = export_all(ckpt, tmp_path, only=["executorch"])
    assert {r.name: r.status for r in rows} == {"executorch_fp32": "failed", "executorch_int8": "failed"}
    assert "real calibration images" in rows[0].error


def test_every_verification_names_the_machine_and_engine(tmp_path, ckpt, synthetic_index):
    from export.onnx import export_onnx
    from train.cpu import cpu_description

    rows = export_onnx(ckpt, tmp_path, eval_samples=seeded_subset(synthetic_index.samples, 4, seed=1),
                       calib_samples=seeded_subset(synthetic_index.samples, 8), int8=("static",))
    for r in rows:
        v = r.verification
        assert r.status == "verified" and v["inputs_origin"] == "real"
        assert v["engine"] == "CPUExecutionProvider" and v["machine"]["cpu_model"] == cpu_description()["cpu_model"]
        assert set(v["machine"]["int8_flags"]) <= set(cpu_description()["int8_flags"]) | {"none"}
    q = rows[1].details["quantization"]
    assert q["x86_isa"] in ("avx2", "vnni") and q["reduce_range"] is (q["x86_isa"] == "avx2")


def test_statuses_mean_one_thing():
    assert status_for({"inputs_origin": "real"}) == ("verified", None)
    assert status_for({"inputs_origin": "synthetic"})[0] == "exported"
    assert status_for({"inputs_origin": "generated"})[0] == "exported"
    assert status_for({"inputs_origin": "real", "executed": False, "method": "weight reconstruction"})[0] == "exported"


# ------------------------------------------------------------------------------------------ ISA-aware int8
def test_ort_avx2_target_keeps_weights_in_seven_bits(tmp_path, ckpt, synthetic_index):
    """7-bit weights (-64..64) make u8 x s8 pair sums fit int16: no saturation on any x86-64 CPU."""
    import onnx
    from onnx import numpy_helper

    from export.onnx import export_onnx

    samples = seeded_subset(synthetic_index.samples, 8)
    ranges = {}
    for isa in ("avx2", "vnni"):
        out = tmp_path / isa
        rows = export_onnx(ckpt, out, eval_samples=samples[:2], calib_samples=samples, int8=("static",), x86_isa=isa)
        assert rows[1].details["quantization"]["x86_isa"] == isa
        graph = onnx.load(str(out / "model_int8_static.onnx")).graph
        weights = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
        ranges[isa] = (min(int(w.min()) for w in weights), max(int(w.max()) for w in weights))
    assert -64 <= ranges["avx2"][0] and ranges["avx2"][1] <= 64  # 2 x 255 x 64 = 32640 < 32768
    assert ranges["vnni"][1] > 63 or ranges["vnni"][0] < -64


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="x86 int8 engines only")
def test_saturation_probe_sees_an_avx2_cpu_emulated_on_this_one():
    """The probe asks the kernels: restricting FBGEMM and oneDNN to AVX2 must make them saturate, whatever
    CPU runs the test; unrestricted, they saturate exactly when the CPU lacks VNNI."""
    from quantize.torch_ao import int8_kernels_saturate
    from train.cpu import cpu_flags, has_vnni

    code = "from quantize.torch_ao import int8_kernels_saturate as s, resolve_x86_isa as r; print(s('x86'), r())"
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "avx2"], out.stderr[-2000:]
    restricted = any(os.environ.get(k) for k in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"))
    flags = cpu_flags()
    if not restricted and ({"avx512_vnni", "amx_int8"} & flags or not has_vnni()):
        # FBGEMM and oneDNN have int32-accumulating kernels for AVX-512 VNNI and AMX, and saturate without
        # any VNNI; AVX-VNNI alone (256-bit, some desktop CPUs) is left out: which kernels run there is not
        # documented, so only the emulated case above is asserted on such a CPU
        assert int8_kernels_saturate("x86") is (not has_vnni())
    assert int8_kernels_saturate("qnnpack") is False


# ---------------------------------------------------------------------------- bundle and recommendation
def test_bundle_ships_only_verified_models(tmp_path, ckpt):
    from mobile_assets.bundle import BundleError, pick_models

    for name, status in (("ptl_fp32", "exported"), ("ptl_int8", "verified")):
        (tmp_path / f"{name}.bin").write_bytes(b"x")
        record(tmp_path, ArtifactEntry(name=name, format="lite", precision="fp32", runtime="pytorch-lite",
                                       path=f"{name}.bin", status=status, source_checkpoint_sha256=ckpt.sha256,
                                       status_reason="numerics check on GENERATED inputs only" if status == "exported"
                                       else None))
    with pytest.raises(BundleError, match="verified on real images"):
        pick_models(tmp_path, ckpt.sha256, None)
    assert [e.name for e in pick_models(tmp_path, ckpt.sha256, None, allow_unverified=True)] == ["ptl_fp32", "ptl_int8"]


def test_recommendation_needs_verified_rows_within_agreement():
    from benchmarks.summary import recommend

    def row(name, status, agree, size, thr):
        return {"name": name, "measured": True, "status": status, "manifest_status": status, "runtime": "onnxruntime",
                "size_bytes": size, "accuracy_change": 0.0, "top1_agreement": agree, "throughput_ips": thr,
                "latency_1t": {"p50_ms": 10.0}}
    rows = [row("base", "baseline", 1.0, 40, 1), row("small_unverified", "exported", 1.0, 10, 90),
            row("small_flips", "verified", 0.9915, 11, 80), row("ok", "verified", 0.998, 12, 50)]
    rec = recommend(rows, max_drop=1.0, baseline="base")
    assert rec["phone"]["name"] == "ok" and rec["server"]["name"] == "ok"
    assert "not verified" in rec["excluded"]["small_unverified"] and "agreement" in rec["excluded"]["small_flips"]


def test_report_sentence_matches_its_tables():
    from benchmarks.quant_render import _sensitivity

    rep = {"sensitivity": {"budget_points": {"accuracy": 0.3, "class_recall": 1.0, "min_top1_agreement": 0.995},
                           "runs": {}, "checked": {"torch_static_int8_x86": ["within budget and agreement target"],
                                                   "onnx_int8_static": ["within budget and agreement target"]}}}
    text = "\n".join(_sensitivity(rep))
    assert "torch_static_int8_x86" in text and "onnx_int8_static" in text and "Every static" not in text


# ------------------------------------------------------------------------------------------- bad inputs
def _bad_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    d = torch.load(tiny_checkpoint, weights_only=True)
    d["state_dict"]["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(d, path)
    return path


BAD_INPUTS = [
    # (id, module, argv template, fragment the error line must contain)
    ("missing checkpoint", "export.onnx", ["--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/o"], "does not exist"),
    ("checkpoint is a folder", "export.onnx", ["--checkpoint", "{tmp}", "--out", "{tmp}/o"], "is a folder"),
    ("checkpoint not torch", "export.onnx", ["--checkpoint", "{junk}", "--out", "{tmp}/o"], "cannot read checkpoint"),
    ("NaN weights (export.lite)", "export.lite.__main__", ["--checkpoint", "{nan}", "--artifacts", "{tmp}/a",
                                                     "--no-bundle", "--int8", "none"], "NaN or inf"),
    ("NaN weights (export)", "export.__main__", ["--checkpoint", "{nan}", "--out", "{tmp}/o", "--int8", "none"],
     "NaN or inf"),
    ("--out is a file (onnx)", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{junk}", "--data", "{data}"],
     "is a file"),
    ("--out is a file (executorch)", "export.executorch", ["--checkpoint", "{ckpt}", "--out", "{junk}",
                                                           "--variants", "fp32"], "is a file"),
    ("--artifacts is a file", "export.lite.__main__", ["--checkpoint", "{ckpt}", "--artifacts", "{junk}", "--no-bundle",
                                                  "--int8", "none"], "is a file"),
    ("missing --data", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--data", "{tmp}/nodata"],
     "no such file"),
    ("--data is not a csv", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--data", "{junk}"],
     "must be a CSV"),
    ("--eval-size 0", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--eval-size", "0"],
     "--eval-size"),
    ("--calib-size 0", "export.__main__", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--calib-size", "0"],
     "--calib-size"),
    ("unknown format", "export.__main__", ["--checkpoint", "{ckpt}", "--formats", "tflite2"], "unknown"),
    ("unknown executorch variant", "export.executorch", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o",
                                                         "--variants", "fp16"], "--variants"),
    ("unknown onnx int8 mode", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--int8", "weird"],
     "--int8"),
    ("bad bytecode version", "export.lite.__main__", ["--checkpoint", "{ckpt}", "--artifacts", "{tmp}/a", "--no-bundle",
                                                 "--int8", "none", "--bytecode-version", "99"], "--bytecode-version"),
    ("bad engine", "export.lite.__main__", ["--checkpoint", "{ckpt}", "--artifacts", "{tmp}/a", "--no-bundle",
                                       "--int8", "dynamic", "--engine", "tpu"], "--engine"),
    ("lite bundle without real data", "export.lite.__main__", ["--checkpoint", "{ckpt}", "--artifacts", "{tmp}/a",
                                                          "--out", "{tmp}/b", "--int8", "none"], "--no-bundle"),
    ("lite --eval-size 0", "export.lite.__main__", ["--checkpoint", "{ckpt}", "--eval-size", "0"], "--eval-size"),
    ("quantize missing data", "quantize.__main__", ["--checkpoint", "{ckpt}", "--data", "{tmp}/nodata",
                                                    "--out", "{tmp}/q"], "no such file"),
    ("quantize --max-images 0", "quantize.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}",
                                                      "--max-images", "0"], "--max-images"),
    ("quantize disagreeing ISA flags", "quantize.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}",
                                                             "--x86-isa", "vnni", "--reduce-range", "on"], "disagree"),
    ("quantize NaN weights", "quantize.__main__", ["--checkpoint", "{nan}", "--data", "{data}", "--out", "{tmp}/q"],
     "NaN or inf"),
    ("benchmark without manifest", "benchmarks.__main__", ["--artifacts", "{tmp}/empty", "--checkpoint", "{ckpt}",
                                                           "--data", "{data}", "--out", "{tmp}/b"], "artifacts"),
    ("unreadable image in --data (export)", "export.onnx", ["--checkpoint", "{ckpt}", "--out", "{tmp}/o", "--data",
                                                             "{corrupt}"], "unreadable image"),
    ("unreadable image in --data (quantize)", "quantize.__main__", ["--checkpoint", "{ckpt}", "--data", "{corrupt}",
                                                                    "--out", "{tmp}/q"], "unreadable image"),
    ("evaluate missing checkpoint", "train.evaluate", ["--checkpoint", "{tmp}/none.pt", "--data", "{data}",
                                                  "--out", "{tmp}/e"],
     "does not exist"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line(case, tmp_path, tiny_checkpoint, synthetic_data, capsys):
    import importlib

    _, module, argv, fragment = case
    junk = tmp_path / "junk.txt"
    junk.write_text("not a model")
    (tmp_path / "empty").mkdir()
    fill = {"tmp": str(tmp_path), "ckpt": str(tiny_checkpoint), "data": str(synthetic_data), "junk": str(junk)}
    if any("{nan}" in a for a in argv):
        fill["nan"] = str(_bad_checkpoint(tmp_path, tiny_checkpoint))
    if any("{corrupt}" in a for a in argv):  # the synthetic images, every one of them cut to a few bytes
        corrupt = shutil.copytree(synthetic_data, tmp_path / "corrupt")
        for image in corrupt.rglob("*.png"):
            image.write_bytes(image.read_bytes()[:40])
        fill["corrupt"] = str(corrupt)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = importlib.import_module(module).main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not list(tmp_path.rglob("artifacts.json"))


# --------------------------------------------------------------------------- an output place that cannot be written
# Every command that writes, each given an output below a file (where no folder can be made) and otherwise
# good inputs. The portable stand-in for a read-only disk: before, most failed only when they first wrote,
# after their work (quantize after calibrating, the benchmark after timing), with an OSError traceback.
WRITERS = [
    ("train.__main__", ["--data", "{data}", "--out", "{out}", "--epochs", "1", "--weights", "none"], "--out"),
    ("train.evaluate", ["--checkpoint", "{ckpt}", "--data", "{data}", "--split", "all", "--out", "{out}"], "--out"),
    ("train.explain.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{out}"], "--out"),
    ("train.convert", ["--weights", "{ckpt}", "--out", "{out}/x.pt"], "--out"),
    ("train.synthetic", ["--out", "{out}"], "--out"),
    ("quantize.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{out}"], "--out"),
    ("export.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{out}"], "--out"),
    ("export.lite.__main__", ["--checkpoint", "{ckpt}", "--data", "{data}", "--artifacts", "{tmp}/a",
                              "--out", "{out}"], "--out"),
    ("mobile_assets.__main__", ["--artifacts", "{tmp}/empty", "--out", "{out}"], "--out"),
    ("benchmarks.__main__", ["--artifacts", "{tmp}/empty", "--checkpoint", "{ckpt}", "--data", "{data}",
                             "--out", "{out}"], "--out"),
    ("benchmarks.ratios", ["--artifacts", "{tmp}/empty", "--checkpoint", "{ckpt}", "--out", "{out}"], "--out"),
    ("benchmarks.ort_profile", ["--artifacts", "{tmp}/empty", "--out", "{out}"], "--out"),
    ("benchmarks.executorch_profile", ["--artifacts", "{tmp}/empty", "--out", "{out}"], "--out"),
    ("benchmarks.pipeline", ["--out", "{out}"], "--out"),
    ("benchmarks.pipeline", ["--out", "{tmp}/p", "--bundle-dir", "{out}"], "--bundle-dir"),
    ("benchmarks.gpu_check", ["--device", "cpu", "--out", "{out}"], "--out"),
    ("benchmarks.train_throughput", ["--data", "{data}", "--json", "{out}/t.json"], "--json"),
    ("benchmarks.serve_load", ["--model-store", "{tmp}/store", "--out", "{out}/s.json"], "--out"),
]


@pytest.mark.parametrize("module, argv, flag", WRITERS, ids=[f"{m.split('.__')[0]} {f}" for m, _, f in WRITERS])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(module, argv, flag, tmp_path,
                                                                      tiny_checkpoint, synthetic_data, capsys):
    import importlib

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "config.properties").write_text("inference_address=http://127.0.0.1:1\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    fill = {"tmp": str(tmp_path), "ckpt": str(tiny_checkpoint), "data": str(synthetic_data),
            "out": str(blocker / "out")}
    code = importlib.import_module(module).main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {flag} {blocker / 'out'}") and f"({blocker} is a file)" in lines[0], err
    assert "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, no folder made


def test_a_read_only_place_is_named_with_the_reason(tmp_path, monkeypatch):
    """A read-only disk (or a folder without permission) fails the write probe: the error gives the system's
    reason. Simulated, since the tests may run as root, for whom permissions do not block writes."""
    import errno
    import tempfile

    from train.atomic import OutputPathError, check_writable_dir, check_writable_file

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputPathError, match=r"--out .*/new/run: cannot write there \(Read-only file system\)"):
        check_writable_dir(tmp_path / "new" / "run")
    with pytest.raises(OutputPathError, match=r"--json .*/r.json: cannot write there \(Read-only file system\)"):
        check_writable_file(tmp_path / "r.json", "--json")
    assert not (tmp_path / "new").exists()


def test_a_full_disk_is_said_in_those_words_and_leaves_no_partial_file(tmp_path, monkeypatch, tiny_spec):
    """torch.save on a full disk raises RuntimeError 'unexpected pos N vs M' (pytorch/pytorch#10577): a
    training run ended with that traceback. Every atomic write now says the disk is full, names the file, and
    leaves nothing; other errors, and torch's words while space is left, pass through unchanged."""
    import shutil as shutil_module
    from collections import namedtuple

    from train import atomic
    from train.checkpoint import make_checkpoint_dict, save_checkpoint
    from train.model import build_network

    usage = namedtuple("usage", "total used free")
    free = {"bytes": 10 << 20}
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - free["bytes"],
                                                                     free["bytes"]))
    real_save = torch.save

    def save_until_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a file that is there, half-written
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 59986880 vs 59986768")

    monkeypatch.setattr(torch, "save", save_until_full)
    dest = tmp_path / "run" / "last.pt"
    ckpt = make_checkpoint_dict(build_network(num_classes=tiny_spec.num_classes).state_dict(), tiny_spec)
    with pytest.raises(atomic.DiskFullError, match=rf"writing {dest} failed: the disk is full \(10\.5 MB left "):
        save_checkpoint(ckpt, dest)
    assert list((tmp_path / "run").iterdir()) == []

    free["bytes"] = 50 << 30  # the same words with space left: not called a full disk
    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        save_checkpoint(ckpt, dest)
    assert not isinstance(caught.value, atomic.DiskFullError)
    free["bytes"] = 1 << 20
    with pytest.raises(ValueError, match="logits differ"):  # another failure on a nearly full disk
        with atomic.atomic_path(tmp_path / "model.onnx"):
            raise ValueError("logits differ")


def test_a_run_or_report_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch, synthetic_data,
                                                                    tiny_checkpoint, capsys):
    """A training run whose checkpoints cannot fit failed when it first saved, after an epoch (minutes to hours
    on real data); a quantization report after calibrating (30 s on cxr4). Both now say so before starting."""
    import shutil as shutil_module
    from collections import namedtuple

    from quantize.__main__ import main as quantize_main
    from train.__main__ import main as train_main
    from train.loop import checkpoint_room

    usage = namedtuple("usage", "total used free")
    free = {"bytes": checkpoint_room(resume=False) - 1}
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 40, 0, free["bytes"]))
    assert checkpoint_room(resume=True) < free["bytes"]  # a resumed run has its files already
    out = tmp_path / "run"
    code = train_main(["--data", str(synthetic_data), "--out", str(out), "--epochs", "1", "--weights", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: writing the checkpoints of {out} needs about " in err and "MB left" in err
    free["bytes"] = 60 << 20  # the report's ONNX files need about 80 MB
    code = quantize_main(["--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data), "--out",
                          str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: writing the quantization report {tmp_path / 'q'} needs about " in err
    assert sorted(tmp_path.iterdir()) == []
