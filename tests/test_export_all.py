"""The format registry drives export, verification and the manifest: one parametrized test per registered
file (a new registry row is tested by adding it), and export_all turning each failure into a row."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest

import export.pipeline as pipeline
from export.__main__ import main as export_main
from export.manifest import ArtifactEntry, read_manifest, read_source, record, verify_file
from export.registry import FORMATS, RegistryError, bundle_variants, format_of, get_format, variant, variants
from export.runners import RUNNERS, get_runner
from train.atomic import sha256_file, size_bytes

pytestmark = pytest.mark.xdist_group("exports")  # the modules that read conftest's all_formats

PRECISIONS = {"fp32", "fp16", "int8", "w8", "palette6", "palette4"}


@pytest.fixture(scope="module")
def exported(all_formats):
    """Every registered format, exported once through the one pipeline (conftest's `all_formats`)."""
    return all_formats


def test_registry_rows_are_complete_and_resolve():
    assert len(variants()) == sum(len(f.variants) for f in FORMATS.values())  # entry names are unique
    files = [v.file for v in variants().values()]
    assert len(files) == len(set(files))
    for f in FORMATS.values():
        assert f.description and f.variants and set(f.int8) <= {"static", "dynamic", "none"}
        module = importlib.import_module(f.module)  # light: heavy libraries load inside the exporters
        assert callable(getattr(module, f.function)), f"{f.module}.{f.function}"
        for v in f.variants:
            assert v.precision in PRECISIONS and v.layout in ("NCHW", "NHWC") and format_of(v.name) is f
            assert v.runtime in RUNNERS or v.runtime == "torchserve", v
            assert not v.calibrated or v.is_int8
    assert next(iter(bundle_variants())) == "ptl_fp32"  # the bundle's primary model comes first


def test_unknown_names_say_what_is_registered():
    with pytest.raises(RegistryError, match="choose from onnx"):
        get_format("tflite2")
    with pytest.raises(RegistryError, match="registered: onnx_fp32"):
        variant("model_x")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(variants()))
def test_every_registered_file_exports_runs_and_is_recorded(exported, name, export_samples, ckpt):
    """Each registry row: written under its registered file name, recorded with the registry's facts, unaltered
    on disk, and run again in its registered runtime (where that runtime runs here)."""
    out, rows = exported
    v, row = variant(name), rows[name]
    unavailable = v.runtime in RUNNERS and RUNNERS[v.runtime].unavailable_reason()
    assert row.status == ("exported" if unavailable else "verified"), row.error or row.status_reason
    entry = ArtifactEntry(**read_manifest(out)["artifacts"][name])
    assert (entry.format, entry.precision, entry.runtime, entry.path) == (format_of(name).name, v.precision,
                                                                          v.runtime, v.file)
    assert entry.source_checkpoint_sha256 == ckpt.sha256 and entry.verification["inputs_origin"] == "real"
    path = verify_file(out, entry)
    assert entry.sha256 == sha256_file(path) and entry.size_bytes == size_bytes(path)
    # the metadata inside the file, read back with the format's own library, is the manifest's record of it
    embedded = importlib.import_module(format_of(name).module).read_metadata(path)
    assert embedded == entry.details["embedded_metadata"] and embedded["artifact"] == name
    assert embedded["classes"] == list(ckpt.spec.class_names) and embedded["precision"] == v.precision
    assert embedded["source_checkpoint_sha256"] == ckpt.sha256
    given = embedded["input"]  # what the file takes and returns, as the file itself does
    if v.runtime == "coreml":  # an image input (ImageType, scale 1/255) and a classifier
        assert (given["layout"], given["value_range"]) == ("image", [0, 255]) and "classLabel" in embedded["outputs"]
    elif v.runtime == "torchserve":  # a served archive: encoded image bytes in, JSON out
        assert given["dtype"].startswith("PNG or JPEG bytes") and embedded["outputs"].startswith("JSON")
    else:
        assert (given["layout"], given["dtype"], given["value_range"]) == (v.layout, "float32", [0.0, 1.0])
        assert given["shape"][0] == ("batch" if v.batch == "dynamic" else 1)  # as the file takes it
        output = (entry.details.get("graph") or {}).get("output") or {}
        assert ("dequantize before softmax" in embedded["outputs"]) == (output.get("dtype") == "int8")
    if v.runtime not in RUNNERS:  # served: checked through its own handler at export
        assert entry.verification["runtime"] == "torchserve handler" and entry.verification["n_images"] >= 1
        return
    if unavailable:  # e.g. CoreML off macOS: checked another way, and says it was not executed
        assert entry.verification.get("executed") is False and "not executed" in entry.status_reason
        return
    from train.data import load_batch

    x = load_batch(export_samples[0], ckpt.spec)
    logits = get_runner(v.runtime, engine=entry.engine).load(path).run(x)
    assert logits.shape == (len(x), ckpt.spec.num_classes)
    if not v.is_int8:
        ref = get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)
        assert abs(logits - ref).max() <= entry.verification["tolerance"]


def test_forced_failure_is_a_row_and_the_others_still_export(tmp_path, ckpt, export_samples, monkeypatch):
    import export.coreml

    def boom(*a, **k):
        raise RuntimeError("forced failure for the test")

    monkeypatch.setattr(export.coreml, "export_coreml", boom)
    rows = pipeline.export_all(ckpt, tmp_path, eval_samples=export_samples[0], calib_samples=export_samples[1],
                               only=["onnx", "coreml", "torchscript"], options={"onnx": {"int8": ("dynamic",)}})
    by = {r.name: r for r in rows}
    coreml = set(FORMATS["coreml"].entries)
    assert set(by) == {"onnx_fp32", "onnx_int8_dynamic", "torchscript_fp32"} | coreml
    for name in coreml:
        assert by[name].status == "failed" and "forced failure" in by[name].error and by[name].path is None
        assert by[name].precision == variant(name).precision  # from the registry, not guessed from the name
    for name in ("onnx_fp32", "onnx_int8_dynamic", "torchscript_fp32"):
        assert by[name].status == "verified", by[name].error
    manifest = read_manifest(tmp_path)["artifacts"]
    assert set(manifest) == set(by)
    config = json.loads((tmp_path / "export_config.json").read_text())
    assert config["results"]["coreml_w8"] == "failed" and config["checkpoint_sha256"] == ckpt.sha256
    timing = read_manifest(tmp_path)["export_timing_s"]  # where the time went, per format and per file
    assert set(timing) == {"onnx", "coreml", "torchscript"} and timing == config["timing_s"]
    assert timing["onnx"]["total"] >= timing["onnx"]["files"]["onnx_fp32"]["convert_and_write"] > 0
    assert timing["onnx"]["files"]["onnx_fp32"]["verify"] > 0 and timing["coreml"]["files"]["coreml_w8"] is None
    assert "quantize" not in timing["onnx"]["files"]["onnx_fp32"]  # a float file has no quantize step
    assert timing["onnx"]["files"]["onnx_int8_dynamic"]["quantize"] > 0
    table = pipeline.timing_table(timing)
    assert f"onnx_int8_dynamic {timing['onnx']['files']['onnx_int8_dynamic']['quantize']:.1f}+" in table
    assert "coreml_w8 -" in table


def test_step_times_split_quantize_from_the_rest_of_writing():
    from export.common import step_times

    assert step_times(10.0, 2.0, 7.5) == {"quantize": 7.5, "convert_and_write": 2.5, "verify": 2.0}
    assert step_times(3.0, 1.0) == {"convert_and_write": 3.0, "verify": 1.0}


def _fake_exporter(entries: tuple[str, ...], fail: bool):
    def exporter(ckpt, out_dir, *, eval_samples=None, calib_samples=None, **_):
        if fail:
            raise ValueError("library exploded")
        rows = []
        for name in entries:
            (Path(out_dir) / f"{name}.bin").write_bytes(name.encode())
            e = ArtifactEntry(name=name, format="fake", precision="fp32", runtime="torch-eager", path=f"{name}.bin",
                              status="verified", sha256=sha256_file(Path(out_dir) / f"{name}.bin"),
                              size_bytes=len(name))
            record(out_dir, e)
            rows.append(e)
        return rows
    return exporter


def test_every_registered_format_becomes_rows(tmp_path, ckpt, monkeypatch):
    """With stub exporters (one raising, one whose module is missing), every entry of every format is recorded."""
    fakes: dict[str, types.SimpleNamespace] = {}
    for f in FORMATS.values():
        fakes.setdefault(f.module, types.SimpleNamespace()).__dict__[f.function] = _fake_exporter(
            f.entries, fail=f.name == "executorch")

    def fake_import(name):
        if name == "export.mar":
            raise ImportError("No module named 'export.mar'")
        return fakes[name]

    monkeypatch.setattr(pipeline.importlib, "import_module", fake_import)
    rows = {r.name: r for r in pipeline.export_all(ckpt, tmp_path)}
    assert set(rows) == set(variants()) == set(read_manifest(tmp_path)["artifacts"])
    assert "library exploded" in rows["executorch_int8"].error and rows["executorch_fp32"].status == "failed"
    assert "export.mar.export_mar is not available" in rows["torchserve_mar"].error
    assert rows["torchserve_mar"].runtime == "torchserve" and rows["executorch_int8"].precision == "int8"
    failed = set(FORMATS["executorch"].entries) | {"torchserve_mar"}
    assert all(rows[n].status == "verified" for n in set(variants()) - failed)


def test_a_format_that_fails_after_its_first_file_fails_the_files_it_never_reached(tmp_path, ckpt, monkeypatch):
    """Re-exported into a folder holding an earlier export, a format that raised after its first file recorded
    only that one: the earlier int8 rows stayed 'verified' beside a float file they were not made from, and the
    command exited 0."""
    entries = FORMATS["onnx"].entries
    earlier = _fake_exporter(entries, fail=False)
    earlier(ckpt, tmp_path)

    def first_then_crash(ckpt, out_dir, **_):
        (Path(out_dir) / "new.bin").write_bytes(b"this run's float file")
        record(out_dir, ArtifactEntry(name=entries[0], format="fake", precision="fp32", runtime="torch-eager",
                                      path="new.bin", status="verified", sha256=sha256_file(Path(out_dir) / "new.bin"),
                                      size_bytes=21))
        raise MemoryError("Unable to allocate 172. MiB")

    monkeypatch.setattr(pipeline.importlib, "import_module",
                        lambda name: types.SimpleNamespace(export_onnx=first_then_crash))
    rows = {r.name: r for r in pipeline.export_format("onnx", ckpt, tmp_path)}
    assert rows[entries[0]].status == "verified" and set(rows) == set(entries)
    assert all(rows[n].status == "failed" and "MemoryError" in rows[n].error for n in entries[1:])
    assert all(read_manifest(tmp_path)["artifacts"][n]["status"] == "failed" for n in entries[1:])


def test_format_options_follow_the_registry():
    opts = pipeline.format_options(["onnx", "lite", "coreml"], "dynamic", x86_isa="avx2")
    assert opts == {"onnx": {"int8": ("dynamic",), "x86_isa": "avx2"},
                    "lite": {"int8": "dynamic", "x86_isa": "avx2"}, "coreml": {}}
    assert [f for f in FORMATS if FORMATS[f].calibrates("static")] == ["onnx", "lite", "executorch", "litert", "ort"]
    assert not any(f.calibrates("dynamic") for f in FORMATS.values())


def test_cli_rejects_unknown_format(capsys):
    assert export_main(["--checkpoint", "x.pt", "--formats", "onnx,tflite"]) == 2
    assert "tflite" in capsys.readouterr().err
    assert export_main(["--checkpoint", "x.pt", "--formats", ","]) == 2  # exported nothing and exited 0
    assert "--formats ',' names no format" in capsys.readouterr().err
    from export.__main__ import _formats

    assert _formats("torchscript, onnx,torchscript") == ["torchscript", "onnx"]  # not two workers on one file


def test_cli_exports_selected_format(tmp_path, tiny_checkpoint, capsys):
    code = export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--formats", "torchscript"])
    out = capsys.readouterr().out
    assert code == 0 and "torchscript_fp32" in out and "total s" in out  # the timing table
    row = read_manifest(tmp_path)["artifacts"]["torchscript_fp32"]
    assert row["status"] == "exported" and "GENERATED" in row["status_reason"]  # no --data: a numerics check
    source = read_source(tmp_path)
    assert source["checkpoint_sha256"] and source["eval_images"] == [] and source["data"] is None


def test_a_subset_exported_over_another_checkpoint_s_export_says_what_stays(tmp_path, tiny_checkpoint, caplog):
    """The folder's source block now describes the new checkpoint while the other format's rows stay: said."""
    import logging

    from train.checkpoint import load_checkpoint, make_checkpoint_dict, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    other = tmp_path / "other.pt"
    save_checkpoint(make_checkpoint_dict({k: v + 0.01 if v.is_floating_point() else v
                                          for k, v in ckpt.state_dict.items()}, ckpt.spec), other)
    assert export_main(["--checkpoint", str(other), "--out", str(tmp_path / "a"), "--formats", "torchscript"]) == 0
    with caplog.at_level(logging.WARNING):
        assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "a"), "--formats",
                            "onnx", "--int8", "none"]) == 0
    assert "also lists 1 file(s) exported from another checkpoint (torchscript_fp32)" in caplog.text


@pytest.mark.slow
def test_the_parallel_export_records_its_run_and_keeps_reuse(exported):
    """Two jobs: every format timed, the run recorded, and ORT Mobile (registered to start after onnx) still
    reuses this export's model.onnx and model_int8_static.onnx instead of exporting and calibrating again."""
    out, rows = exported
    manifest = read_manifest(out)
    assert manifest["export_run"]["jobs"] == 2 and manifest["export_run"]["wall_s"] > 0
    assert set(manifest["export_timing_s"]) == set(FORMATS) and set(manifest["artifacts"]) == set(variants())
    assert rows["ort_mobile_fp32"].details["float_source"] == "model.onnx of this export"
    assert "model_int8_static.onnx" in rows["ort_mobile_int8"].details["quantization"]["reused"]


def test_run_in_batches_joins_chunks_in_order_and_channels_last_keeps_the_logits(ckpt):
    import numpy as np
    import torch

    from train.model import channels_last

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x.flatten(1)[:, :2]

    x = np.random.default_rng(0).random((37, 3, 4, 4), dtype=np.float32)
    out = get_runner("torch-eager").use_module(Recorder()).run_in_batches(x, batch=16)
    assert seen == [16, 16, 5] and np.array_equal(out, x.reshape(37, -1)[:, :2])

    model = ckpt.build_deploy_model()
    images = np.random.default_rng(1).random((3, 3, 64, 64), dtype=np.float32)
    ref = get_runner("torch-eager").use_module(model).run(images)
    fast = channels_last(ckpt.build_deploy_model())
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(get_runner("torch-eager").use_module(fast).run(images) - ref).max() <= 1e-4


def test_a_full_disk_is_a_failed_row_that_names_the_file_and_what_to_do(tmp_path, ckpt):
    """torch.onnx's writer reports a full disk with no file name (torch.save's as 'unexpected pos N vs M'); the
    row names the file and what to do (train.atomic.DiskFullError, from atomic_path)."""
    import errno
    import os

    from export.common import write_proven

    def full(tmp):
        tmp.write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    row = write_proven(ckpt, tmp_path, "onnx_fp32", write=full, prove=lambda p: {})
    assert row.status == "failed" and row.path is None
    assert row.error.startswith(f"DiskFullError: writing {tmp_path / 'model.onnx'} failed: the disk is full (")
    assert row.error.endswith("free space there or choose another output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".artifacts.json.lock", "artifacts.json"]
    other = write_proven(ckpt, tmp_path, "onnx_fp32", write=lambda t: (_ for _ in ()).throw(ValueError("bad")),
                         prove=lambda p: {})
    assert other.error == "ValueError: bad"  # other failures keep their own words


def test_a_file_that_cannot_fit_is_refused_before_its_writer_runs(tmp_path, ckpt, monkeypatch):
    """On a nearly full disk torch's lite-interpreter writer aborted the whole process (exit 134, 'terminate
    called ... unexpected pos') and left its partial file: `python -m export.lite` died that way. A file that
    cannot fit is now a failed row before its writer starts."""
    import shutil
    from collections import namedtuple

    from export.common import expected_size, write_proven

    need = expected_size(ckpt, "fp32")
    assert expected_size(ckpt, "int8") < need / 3
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, need - 1))
    ran = []
    row = write_proven(ckpt, tmp_path, "ptl_fp32", write=ran.append, prove=lambda p: {})
    assert ran == [] and row.status == "failed"
    assert f"DiskFullError: writing {tmp_path / 'model.ptl'} needs about " in row.error
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    write_proven(ckpt, tmp_path, "ptl_int8", write=ran.append, prove=lambda p: {})
    assert len(ran) == 1  # an int8 file needs a quarter of the room



def test_a_verification_on_few_images_is_said_to_be_coarse():
    """Kaggle's chest_xray holds 16 val images: 'verified' with top-1 agreement 1.000 on them says little, and
    the table now says so; 100 images (the default --eval-size) need no note."""
    import io

    from export.cli import print_entries
    from export.manifest import ArtifactEntry

    def row(n: int) -> ArtifactEntry:
        return ArtifactEntry(name="onnx_fp32", format="onnx", precision="fp32", runtime="onnxruntime",
                             path="model.onnx", status="verified", size_bytes=1,
                             verification={"n_images": n, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0})
    for n, noted, lowest in ((16, True, 0.025 ** (1 / 16)), (100, False, 0.025 ** (1 / 100))):
        out = io.StringIO()
        print_entries([row(n)], file=out)
        assert (f"note: verified on only {n} real images" in out.getvalue()) == noted
        # every table says what its lowest agreement means at that many images: all n agree -> (alpha/2)^(1/n)
        assert (f"note: the lowest top-1 agreement, 1.000 (onnx_fp32) on {n} real images, has the exact 95% "
                f"interval {lowest:.3f}-1.000 on images like them") in out.getvalue()
