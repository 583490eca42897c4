"""The Flutter bundle: schema-valid manifest, labels, test vectors that reproduce, safe replacement."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import mobile_assets.bundle as bundle
from export.lite.__main__ import main
from export.runners import get_runner
from mobile_assets import SCHEMA_PATH, ManifestValidationError, validate_manifest
from mobile_assets.check import check_bundle
from train.spec import load_unit_image


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint, synthetic_data):
    """One end-to-end `python -m export.lite` run with --data: export, prove, bundle."""
    root = tmp_path_factory.mktemp("lite_cli")
    code = main(["--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data),
                 "--artifacts", str(root / "artifacts"), "--out", str(root / "bundle"), "--calib-size", "16",
                 "--eval-size", "8", "--metrics-size", "12", "--test-vectors", "3", "--no-torchscript"])
    assert code == 0
    return root / "artifacts", root / "bundle"


def _spec_of(artifacts_dir):
    from export.manifest import read_source
    from train.spec import PreprocessSpec

    return PreprocessSpec.from_dict(read_source(artifacts_dir)["spec"])


def _copy_bundle(src, dest):
    shutil.copytree(src, dest)
    return dest


def test_manifest_validates_and_says_what_apps_need(built, ckpt):
    _, out = built
    m = check_bundle(out)  # schema + every file's sha256
    assert m["classes"] == list(ckpt.spec.class_names)
    assert m["input"]["shape"] == [1, 3, 32, 32] and m["input"]["normalization_inside_model"] is True
    assert m["input"]["value_range"] == [0.0, 1.0] and "softmax" in m["outputs"]["postprocess"]
    assert m["runtime"]["int8_engine"] == "qnnpack" and isinstance(m["runtime"]["bytecode_version"], int)
    assert m["runtime"]["optimize_for_mobile"]["status"] in ("applied", "not applied")
    assert "NOT A MEDICAL DEVICE" in m["notice"]
    assert {f["path"] for f in m["files"]} >= {"model.ptl", "model_int8.ptl", "labels.txt", "README.md"}
    ev = m["evaluation"]
    assert 4 <= ev["n_images"] <= 12 and ev["split"] == "val"
    assert set(ev["float"]["per_class_recall"]) == set(ckpt.spec.class_names)
    assert 0 <= ev["int8_vs_float"]["top1_agreement"] <= 1
    assert (out / "README.md").read_text() == (SCHEMA_PATH.parent / "README.md").read_text()


def test_invalid_manifest_fails_validation(built):
    _, out = built
    good = json.loads((out / "manifest.json").read_text())
    for breaks in (lambda m: m.pop("classes"), lambda m: m["input"].update(normalization_inside_model=False),
                   lambda m: m["files"][0].update(sha256="not-a-hash"), lambda m: m.update(notice="fine to use")):
        bad = copy.deepcopy(good)
        breaks(bad)
        with pytest.raises(ManifestValidationError):
            validate_manifest(bad)


def test_labels_in_output_order(built, ckpt):
    _, out = built
    assert (out / "labels.txt").read_text().splitlines() == list(ckpt.spec.class_names)


def test_vectors_reproduce_expected_logits_in_lite_interpreter(built, ckpt):
    _, out = built
    m = json.loads((out / "manifest.json").read_text())
    expected = json.loads((out / "test_vectors" / "expected_logits.json").read_text())["logits"]
    assert len(m["test_vectors"]["vectors"]) == 3
    previous = torch.backends.quantized.engine
    try:
        fp32 = get_runner("pytorch-lite").load(out / "model.ptl")
        int8 = get_runner("pytorch-lite", engine="qnnpack").load(out / "model_int8.ptl")
        for v in m["test_vectors"]["vectors"]:
            x = np.fromfile(out / v["input"], dtype="<f4").reshape(v["shape"])
            assert np.array_equal(x[0], load_unit_image(out / v["png"], ckpt.spec))  # decode+resize agree
            assert np.abs(fp32.run(x)[0] - expected["model.ptl"][v["name"]]).max() <= 1e-4
            assert np.abs(int8.run(x)[0] - expected["model_int8.ptl"][v["name"]]).max() <= 1e-3
            assert np.abs(np.array(expected["model.ptl"][v["name"]])
                          - expected["reference (PyTorch eager float)"][v["name"]]).max() <= 1e-4
    finally:
        torch.backends.quantized.engine = previous


def test_a_vector_checks_the_apps_resize_when_the_data_is_at_the_input_size(built, ckpt):
    """The data's images are at the input size (as cxr4's are), so no vector would pass through a resize and
    an app that resizes unlike PIL's bilinear would still pass the decoding check. The last vector is then an
    enlarged image, which a sampling resize (the Dart image package's linear) misses by far more than the
    1/255 the guide allows, and PIL's bilinear meets exactly."""
    from PIL import Image

    from benchmarks.resize_parity import dart_linear

    _, out = built
    vectors = json.loads((out / "manifest.json").read_text())["test_vectors"]["vectors"]
    last, size = vectors[-1], ckpt.spec.input_size
    assert "enlarged to 144 px" in last["source"] and all("enlarged" not in v["source"] for v in vectors[:-1])
    png = Image.open(out / last["png"])
    assert png.size == (144, 144)
    x = np.fromfile(out / last["input"], dtype="<f4").reshape(last["shape"])[0, 0]
    pil = np.asarray(png.convert("L").resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    sampled = dart_linear(np.asarray(png.convert("L")), size) / 255.0
    assert np.abs(pil - x).max() < 1e-6 and np.abs(sampled - x).max() > 5 / 255


def test_refuses_existing_bundle_without_force(built, ckpt, tiny_checkpoint, synthetic_data, tmp_path, capsys):
    art, out = built
    with pytest.raises(bundle.BundleError, match="already holds a bundle.*--force"):
        bundle.write_bundle(art, out)
    code = main(["--checkpoint", str(tiny_checkpoint), "--artifacts", str(tmp_path / "a"), "--out", str(out),
                 "--data", str(synthetic_data)])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before any export work


def test_force_replaces_generated_files_only(built, ckpt, tmp_path):
    art, out = built
    target = _copy_bundle(out, tmp_path / "mobile_assets")
    for source in ("__init__.py", "manifest.schema.json", "notes.txt"):
        (target / source).write_text(f"source file {source}\n")
    (target / "model.pte").write_bytes(b"stale ExecuTorch program of an old bundle")
    bundle.write_bundle(art, target, force=True, include=["ptl_fp32"], test_vectors=1)
    for source in ("__init__.py", "manifest.schema.json", "notes.txt"):
        assert (target / source).read_text() == f"source file {source}\n"
    assert not (target / "model.pte").exists() and not (target / "model_int8.ptl").exists()
    m = check_bundle(target)
    assert [x["file"] for x in m["models"]] == ["model.ptl"]
    assert "float" in m["evaluation"] and "int8" not in m["evaluation"]  # scored on the data artifacts.json records
    assert len(list((target / "test_vectors").glob("*.bin"))) == 1
    assert "image from --data" in m["test_vectors"]["vectors"][0]["source"]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_failure_before_commit_keeps_old_bundle(built, ckpt, tmp_path, monkeypatch):
    art, out = built
    target = _copy_bundle(out, tmp_path / "bundle")
    before = (target / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing test vectors")

    monkeypatch.setattr(bundle, "write_test_vectors", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        bundle.write_bundle(art, target, force=True)
    assert (target / "manifest.json").read_bytes() == before
    check_bundle(target)
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_failure_during_commit_leaves_no_manifest(built, ckpt, tmp_path, monkeypatch):
    art, out = built
    target = _copy_bundle(out, tmp_path / "bundle")
    real, calls = bundle._replace, []

    def flaky(src, dest):
        calls.append(dest.name)
        if len(calls) == 2:
            raise OSError("simulated disk error mid-move")
        real(src, dest)

    monkeypatch.setattr(bundle, "_replace", flaky)
    with pytest.raises(bundle.BundleError, match="simulated disk error"):
        bundle.write_bundle(art, target, force=True, test_vectors=1)
    assert not (target / "manifest.json").exists()  # the folder no longer claims to hold a bundle
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_unwritable_or_file_target_is_a_clear_error(built, ckpt, tmp_path):
    from train.atomic import OutputPathError

    art, _ = built
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(bundle.BundleError, match="is a file"):
        bundle.write_bundle(art, blocker)
    with pytest.raises(OutputPathError, match=f"--out {blocker / 'bundle'}: cannot write there "):
        bundle.write_bundle(art, blocker / "bundle")  # found before the models are read and scored


def test_the_export_folder_is_refused_as_the_bundle_folder(built, tmp_path, tiny_checkpoint, synthetic_data, capsys):
    """`--out artifacts/` (the export's --out) removed the exported models of bundle names that artifacts.json
    still listed (--runtime pytorch_lite there deleted model.pte, model.tflite, ...)."""
    from export.lite.__main__ import main as lite_main

    art, _ = built
    export = tmp_path / "artifacts"
    shutil.copytree(art, export)
    (export / "model.pte").write_bytes(b"an exported ExecuTorch program")
    before = sorted(p.name for p in export.iterdir())
    for out in (export, tmp_path / "." / "artifacts"):
        with pytest.raises(bundle.BundleError, match=r"is an export folder \(artifacts.json\): a bundle there would "
                                                     r"replace or remove the exported models"):
            bundle.write_bundle(export, out, force=True)
    assert sorted(p.name for p in export.iterdir()) == before
    fresh = tmp_path / "fresh"  # export.lite with --out the same as --artifacts: refused before the export
    assert lite_main(["--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data), "--artifacts",
                      str(fresh), "--out", str(fresh)]) == 2
    assert "is an export folder" in capsys.readouterr().err and not list(fresh.glob("model*"))


def test_verification_images_that_moved_are_found_under_data(built, synthetic_data, tmp_path):
    """The export copied to another machine, or the data folder renamed: the error said to pass --data, and with
    --data it said the same. The recorded images are now looked up under --data by their path in the old folder."""
    art, _ = built
    export = tmp_path / "artifacts"
    shutil.copytree(art, export)
    doc = json.loads((export / "artifacts.json").read_text())
    old, gone = str(synthetic_data), str(tmp_path / "gone" / "data")
    doc["source"]["data"] = gone
    for r in doc["source"]["eval_images"]:
        r["path"] = r["path"].replace(old, gone)
    (export / "artifacts.json").write_text(json.dumps(doc))
    with pytest.raises(bundle.BundleError, match="verification images are gone .* pass --data with the images"):
        bundle.write_bundle(export, tmp_path / "b0", include=["ptl_fp32"], test_vectors=1)
    moved = shutil.copytree(synthetic_data, tmp_path / "moved" / "data")
    bundle.write_bundle(export, tmp_path / "b1", data=moved, include=["ptl_fp32"], test_vectors=2)
    spec = _spec_of(export)
    recorded = [load_unit_image(r["path"].replace(gone, str(moved)), spec) for r in doc["source"]["eval_images"]]
    first = np.fromfile(tmp_path / "b1" / "test_vectors" / "vector_00.bin", dtype="<f4").reshape(recorded[0].shape)
    assert any(np.array_equal(first, x) for x in recorded)  # a verification image, found where it moved

def test_no_verified_model_for_this_checkpoint(built, ckpt, tmp_path):
    from export.manifest import ManifestError, read_manifest, record_source

    with pytest.raises(ManifestError, match="no artifacts.json.*python -m export"):
        bundle.write_bundle(tmp_path / "empty_artifacts", tmp_path / "bundle")
    art, _ = built
    (tmp_path / "other").mkdir()
    record_source(tmp_path / "other", {**read_manifest(art)["source"], "checkpoint_sha256": "0" * 64})
    with pytest.raises(bundle.BundleError, match="no ptl_fp32 or executorch_fp32 or litert_fp32 or ort_mobile_fp32 entry verified"):
        bundle.write_bundle(tmp_path / "other", tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_python_m_mobile_assets_builds_the_bundle_from_artifacts_json_alone(built, tmp_path, capsys):
    """The bundle is mobile_assets' job: the same bundle from artifacts.json, with no checkpoint or data flag."""
    from mobile_assets.__main__ import main as bundle_main

    art, out = built
    assert bundle_main(["--artifacts", str(art), "--out", str(tmp_path / "b"), "--metrics-size", "12"]) == 0
    m, ref = check_bundle(tmp_path / "b"), json.loads((out / "manifest.json").read_text())
    assert [x["sha256"] for x in m["models"]] == [x["sha256"] for x in ref["models"]]
    assert [x["app_runtime"] for x in m["models"]] == ["pytorch_lite", "pytorch_lite"]
    assert m["evaluation"]["float"] == ref["evaluation"]["float"]
    assert bundle_main(["--artifacts", str(art), "--out", str(tmp_path / "b")]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err


def test_a_bundle_per_app_runtime(built, ckpt, tmp_path, caplog):
    """--runtime picks the files one Flutter plugin loads; NHWC models get NHWC test vectors and input shape."""
    pytest.importorskip("litert_torch")
    from export.litert import export_litert
    from export.manifest import read_source
    from mobile_assets.__main__ import main as bundle_main
    from train.data import Sample

    art, _ = built
    art2 = tmp_path / "artifacts"
    shutil.copytree(art, art2)
    verify = [Sample(__import__("pathlib").Path(r["path"]), r["label"]) for r in read_source(art2)["eval_images"]]
    (row,) = export_litert(ckpt, art2, eval_samples=verify, variants=("fp32",))
    assert row.status == "verified"
    assert bundle_main(["--artifacts", str(art2), "--out", str(tmp_path / "tfl"), "--runtime", "tflite_flutter",
                        "--test-vectors", "1"]) == 0
    m = check_bundle(tmp_path / "tfl")
    assert [x["file"] for x in m["models"]] == ["model.tflite"] and m["runtime"]["app_runtimes"] == ["tflite_flutter"]
    assert m["input"]["layout"] == "NHWC" and m["input"]["shape"] == [1, 32, 32, 3]
    vec = m["test_vectors"]["vectors"][0]
    x = np.fromfile(tmp_path / "tfl" / vec["input_nhwc"], dtype="<f4").reshape(1, 32, 32, 3)
    expected = json.loads((tmp_path / "tfl" / "test_vectors" / "expected_logits.json").read_text())["logits"]
    logits = get_runner("litert").load(tmp_path / "tfl" / "model.tflite").run(x.transpose(0, 3, 1, 2))
    assert np.abs(logits[0] - expected["model.tflite"][vec["name"]]).max() <= 1e-4
    assert "Flutter runtimes" not in caplog.text  # one runtime: nothing to say
    assert bundle_main(["--artifacts", str(art2), "--out", str(tmp_path / "all"), "--test-vectors", "1"]) == 0
    files = [x["file"] for x in check_bundle(tmp_path / "all")["models"]]
    assert files == ["model.ptl", "model_int8.ptl", "model.tflite"]
    assert "model files of 2 Flutter runtimes" in caplog.text and "--runtime NAME" in caplog.text
    for name, models in (("tfl", ["model.tflite"]), ("all", files)):  # the README's pubspec.yaml ships them
        assert {*models, "labels.txt", "manifest.json"} <= _pubspec_assets(tmp_path / name)


def test_a_bundle_of_every_runtime_says_an_app_loads_one_and_when_it_outgrows_google_play():
    """Every runtime's float and int8 ResNet-18 (the sizes the reference weights export to) make 210 MB of
    models, more than Google Play takes in an app's base module; one runtime's files are a quarter of it."""
    mb = 1_000_000
    every = {"pytorch_lite": 53 * mb, "executorch_flutter": 53 * mb, "tflite_flutter": 52 * mb,
             "flutter_onnxruntime": 52 * mb}
    advice = bundle.size_advice(every)
    assert advice.startswith("this bundle holds the model files of 4 Flutter runtimes (210 MB)")
    assert "tflite_flutter 52 MB" in advice and "--runtime NAME" in advice
    assert "about 195 MB of the 200 MB Google Play accepts" in advice
    assert "about 208 MB, more than the 200 MB" in bundle.size_advice({**every, "tflite_flutter": 66 * mb})
    assert "Google Play" not in bundle.size_advice({"pytorch_lite": 53 * mb, "tflite_flutter": 52 * mb})
    assert bundle.size_advice({"tflite_flutter": 52 * mb}) is None


def _pubspec_assets(bundle_dir, folder="assets/cxr/"):
    """The bundle's files that the pubspec.yaml of its README declares, the bundle copied to assets/cxr/ (a
    folder entry takes the files directly in it, as Flutter does)."""
    text = (bundle_dir / "README.md").read_text()
    block = text.split("## pubspec.yaml", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    entries = [ln.split("#")[0].strip()[2:].strip() for ln in block.splitlines() if ln.strip().startswith("- ")]
    declared = set()
    for entry in entries:
        rel = entry[len(folder):]
        if entry.endswith("/"):
            declared |= {f"{rel}{p.name}" for p in (bundle_dir / rel).iterdir() if p.is_file()}
        else:
            declared.add(rel)
    return declared


def test_a_flutter_onnxruntime_bundle(built, ckpt, tmp_path):
    """--runtime flutter_onnxruntime: the batch-1 .onnx with ORT's NNAPI/CoreML verdicts, not the .ort files."""
    from export.manifest import read_source
    from export.ort_mobile import export_ort
    from mobile_assets.__main__ import main as bundle_main
    from train.data import Sample

    art, _ = built
    art2 = tmp_path / "artifacts"
    shutil.copytree(art, art2)
    verify = [Sample(__import__("pathlib").Path(r["path"]), r["label"]) for r in read_source(art2)["eval_images"]]
    rows = export_ort(ckpt, art2, eval_samples=verify, variants=("fp32",))
    assert [r.status for r in rows] == ["verified", "verified"]
    assert bundle_main(["--artifacts", str(art2), "--out", str(tmp_path / "ort"), "--runtime",
                        "flutter_onnxruntime", "--test-vectors", "1"]) == 0
    m = check_bundle(tmp_path / "ort")
    (model,) = m["models"]
    assert model["file"] == "model_mobile.onnx" and model["app_runtime"] == "flutter_onnxruntime"
    assert model["batch"] == "1" and model["mobile_usability"]["nnapi"]["should_perform_well"] == "YES"
    assert not list((tmp_path / "ort").glob("*.ort"))
    expected = json.loads((tmp_path / "ort" / "test_vectors" / "expected_logits.json").read_text())["logits"]
    vec = m["test_vectors"]["vectors"][0]
    x = np.fromfile(tmp_path / "ort" / vec["input"], dtype="<f4").reshape(1, 3, 32, 32)
    logits = get_runner("onnxruntime").load(tmp_path / "ort" / "model_mobile.onnx").run(x)
    assert np.abs(logits[0] - expected["model_mobile.onnx"][vec["name"]]).max() <= 1e-4


def test_a_bundle_that_cannot_fit_is_refused_before_its_models_are_scored(built, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from train.atomic import DiskFullError

    art, _ = built
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 20))
    monkeypatch.setattr(bundle, "evaluate_models", lambda *a, **k: pytest.fail("scored before the room was known"))
    with pytest.raises(DiskFullError, match=f"writing the bundle {tmp_path / 'b'} needs about .* MB left"):
        bundle.write_bundle(art, tmp_path / "b", data=None)
    assert not (tmp_path / "b").exists()


def test_a_test_vector_holds_the_image_as_the_model_read_it(tmp_path):
    """The vector PNG (which keeps no EXIF orientation) of a sideways-stored phone JPEG, and of a float TIFF in
    [0, 1], reads back as the model read its source: upright, and not black."""
    from PIL import Image

    from mobile_assets.vectors import _write_inputs
    from train.spec import PreprocessSpec

    spec = PreprocessSpec(input_size=32)
    yy, xx = np.mgrid[0:96, 0:64]
    upright = ((yy * 2 + (xx > 40) * 60) % 256).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif)
    Image.fromarray(upright.astype(np.float32) / 255).save(tmp_path / "float.tif")
    sources = [(tmp_path / "photo.jpg", "val"), (tmp_path / "float.tif", "val")]
    (tmp_path / "out").mkdir()
    _, batch = _write_inputs(tmp_path / "out", spec, sources, nhwc=False)
    for x, (src, _) in zip(batch, sources):
        assert np.array_equal(x, load_unit_image(src, spec)), src.name


def test_check_replays_a_copied_bundle_and_names_what_is_wrong(built, tmp_path, capsys):
    """`python -m mobile_assets --check DIR` on the folder an app ships: every model agrees with its expected
    logits in its runtime here; a file cut short (a git LFS pointer), a missing file or manifest is named with
    what to do; a model that no longer gives the promised logits fails the check."""
    from mobile_assets.__main__ import main as bundle_main
    from train.atomic import sha256_file

    _, out = built
    app = _copy_bundle(out, tmp_path / "assets" / "cxr")
    (app / "model_old.ptl").write_bytes(b"stale")
    assert bundle_main(["--check", str(app)]) == 0
    said = capsys.readouterr().out
    assert "manifest.json valid" in said and "not in manifest.json (left from another bundle?): model_old.ptl" in said
    assert said.count(" agrees ") == 2 and "model_int8.ptl" in said and "pytorch-lite (qnnpack)" in said

    manifest = json.loads((app / "manifest.json").read_text())
    expected_file = app / manifest["test_vectors"]["expected_logits"]
    expected = json.loads(expected_file.read_text())
    for name in expected["logits"]["model.ptl"]:
        expected["logits"]["model.ptl"][name][0] += 0.5
    expected_file.write_text(json.dumps(expected))
    for f in manifest["files"]:
        if app / f["path"] == expected_file:
            f["sha256"], f["size_bytes"] = sha256_file(expected_file), expected_file.stat().st_size
    (app / "manifest.json").write_text(json.dumps(manifest))
    assert bundle_main(["--check", str(app)]) == 1
    assert "model.ptl" in (line := next(l for l in capsys.readouterr().out.splitlines() if "model.ptl " in l))
    assert " differs " in line and "max|dlogit| 5.00e-01" in line

    (app / "model_int8.ptl").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 11\n")
    assert bundle_main(["--check", str(app)]) == 2
    err = capsys.readouterr().err
    assert "model_int8.ptl: its sha256 differs from manifest.json" in err and "git LFS pointer" in err
    shutil.copyfile(out / "model_int8.ptl", app / "model_int8.ptl")
    labels = (app / "labels.txt").read_bytes()  # git's core.autocrlf on Windows turns LF into CRLF
    (app / "labels.txt").write_bytes(labels.replace(b"\n", b"\r\n"))
    assert bundle_main(["--check", str(app)]) == 2
    err = capsys.readouterr().err
    assert "labels.txt: its line endings were turned into CRLF" in err and "a line `assets/cxr/** -text` (the " \
        "bundle's folder from your app repository's root)" in err
    (tmp_path / ".git").mkdir()  # the app's repository: its .gitattributes patterns are relative to its root
    assert bundle_main(["--check", str(app)]) == 2
    assert f"a line `assets/cxr/** -text` in {tmp_path / '.gitattributes'}" in capsys.readouterr().err
    (app / "labels.txt").unlink()
    assert bundle_main(["--check", str(app)]) == 2
    assert "labels.txt: listed in manifest.json but missing; copy the whole bundle folder" in capsys.readouterr().err
    (app / "manifest.json").unlink()
    assert bundle_main(["--check", str(app)]) == 2
    assert "no manifest.json, so no complete bundle" in capsys.readouterr().err
