"""benchmarks: every artifact measured in its own runtime and fresh process; bad inputs become failed rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.__main__ import main as bench_main
from benchmarks.machine import machine_info, resnet18_gflop
from benchmarks.metrics import compressed_size
from benchmarks.run import BASELINE, run_benchmarks
from export.manifest import ArtifactEntry, describe_file, record
from export.onnx import write_onnx
from train.checkpoint import load_checkpoint
from train.data import assign_splits, discover, load_batch
from train.synthetic import make_synthetic_dataset

# threads_all=1: two OpenMP threads on a busy 2-core machine spin-wait for seconds; no timing is asserted
FAST = {"runs": 3, "warmup": 1, "batch": 8, "threads_all": 1, "progress": False}


def _entry(out: Path, name: str, fmt: str, runtime: str, file: Path, sha: str | None) -> ArtifactEntry:
    return ArtifactEntry(name=name, format=fmt, precision="fp32", runtime=runtime, status="verified",
                         source_checkpoint_sha256=sha, **describe_file(out, file))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_checkpoint) -> Path:
    """ptl fp32, TorchScript and ONNX fp32 of the tiny checkpoint, recorded in a manifest."""
    out = tmp_path_factory.mktemp("artifacts")
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.build_deploy_model()
    scripted = torch.jit.script(model)
    scripted.save(str(out / "model.torchscript.pt"))
    scripted._save_for_lite_interpreter(str(out / "model.ptl"))
    write_onnx(model, ckpt.spec, out / "model.onnx")
    for name, fmt, runtime, file in (("ptl_fp32", "ptl", "pytorch-lite", "model.ptl"),
                                     ("torchscript_fp32", "torchscript", "torchscript", "model.torchscript.pt"),
                                     ("onnx_fp32", "onnx", "onnxruntime", "model.onnx")):
        record(out, _entry(out, name, fmt, runtime, out / file, ckpt.sha256))
    return out


@pytest.fixture(scope="module")
def happy(artifacts, tiny_checkpoint, synthetic_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    return run_benchmarks(artifacts, tiny_checkpoint, synthetic_data, out_dir=out, **FAST)


def _rows(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in result["rows"]}


def test_every_row_measured_with_sane_figures(happy, artifacts):
    rows = _rows(happy)
    assert list(rows) == [BASELINE, "ptl_fp32", "torchscript_fp32", "onnx_fp32"]
    for name, r in rows.items():
        assert r["measured"], (name, r.get("reason"))
        assert r["status"] in ("baseline", "verified")
        assert r["latency_1t"]["runs"] == 3 and r["latency_all"]["runs"] == 3
        assert 0 < r["latency_1t"]["p50_ms"] <= r["latency_1t"]["p99_ms"]
        assert r["throughput_ips"] > 0 and r["peak_rss_mb"] >= r["rss_before_load_mb"] > 0
        assert r["load_s"] > 0 and r["first_inference_ms"] > 0 and r["threads_1t"] == 1
        assert r["import_s"] >= 0  # the runtime's Python import, timed apart from the load
        assert 0 < r["gzip_bytes"]
    for name, file in (("ptl_fp32", "model.ptl"), ("torchscript_fp32", "model.torchscript.pt"),
                       ("onnx_fp32", "model.onnx")):
        assert rows[name]["size_bytes"] == (artifacts / file).stat().st_size
        assert rows[name]["gzip_bytes"] == compressed_size(artifacts / file)
        assert rows[name]["top1_agreement"] == 1.0, name
        assert abs(rows[name]["accuracy_change"]) < 1e-9
        assert rows[name]["max_abs_logit_diff"] < 1e-3
    assert rows["onnx_fp32"]["engine"] == "CPUExecutionProvider"


def test_accuracy_matches_a_recomputation(happy, tiny_checkpoint, synthetic_data):
    ckpt = load_checkpoint(tiny_checkpoint)
    idx = assign_splits(discover(synthetic_data, class_names=ckpt.spec.class_names), seed=0)
    samples = idx.split("val")
    with torch.inference_mode():
        logits = ckpt.build_deploy_model()(torch.from_numpy(load_batch(samples, ckpt.spec))).numpy()
    labels = np.array([s.label for s in samples])
    expected = float((logits.argmax(1) == labels).mean() * 100)
    rows = _rows(happy)
    assert happy["data"]["n_images"] == len(samples)
    assert "seeded stratified split (seed 0)" in happy["data"]["split_note"]  # folder data names no split
    assert rows[BASELINE]["accuracy"] == pytest.approx(expected)
    assert rows["onnx_fp32"]["accuracy"] == pytest.approx(expected)
    assert set(rows[BASELINE]["recall"]) == set(ckpt.spec.class_names)


def test_a_runtime_that_gains_nothing_from_threads_is_scored_in_shards(artifacts, tiny_checkpoint, tmp_path):
    from benchmarks.run import sharded_eval
    from benchmarks.worker import gains_from_threads
    from export.runners import get_runner

    assert not gains_from_threads({"latency_all": {"min_ms": 95.0}, "latency_1t": {"min_ms": 100.0}}, 2)
    assert gains_from_threads({"latency_all": {"min_ms": 55.0}, "latency_1t": {"min_ms": 100.0}}, 2)
    assert gains_from_threads({"latency_all": {"min_ms": 100.0}, "latency_1t": {"min_ms": 100.0}}, 1)
    size = load_checkpoint(tiny_checkpoint).spec.input_size
    images = np.random.default_rng(0).random((7, 3, size, size), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    base = {"runtime": "onnxruntime", "path": str(artifacts / "model.onnx"), "engine": None, "batch": 4,
            "images": str(tmp_path / "images.npy"), "logits_out": str(tmp_path / "all.npy"), "min_throughput_images": 8}
    res = sharded_eval(base, "t", tmp_path, {"threads_all": 2, "timeout": 300})
    assert res["eval_processes"] == 2 and res["throughput_images"] >= 7 and res["throughput_ips"] > 0
    expected = get_runner("onnxruntime", threads=1).load(artifacts / "model.onnx").run(images)
    np.testing.assert_allclose(np.load(tmp_path / "all.npy"), expected, atol=1e-5)  # shards joined in image order
    np.save(tmp_path / "images.npy", images[:1])  # fewer images than cores (--max-images 1): a worker had none
    res = sharded_eval(base, "t", tmp_path, {"threads_all": 2, "timeout": 300})
    assert res.get("eval_processes") == 1, res
    np.testing.assert_allclose(np.load(tmp_path / "all.npy"), expected[:1], atol=1e-5)


def test_relative_paths_from_a_folder_outside_the_repo(artifacts, tiny_checkpoint, synthetic_data, tmp_path,
                                                       monkeypatch):
    """The workers run in the toolkit's folder: a relative --artifacts from anywhere else (the README's pipeline
    with `--out "demo run"` in a user's folder) failed every row with 'File doesn't exist'."""
    here = tmp_path / "my runs"
    shutil.copytree(artifacts, here / "artifacts")
    shutil.copy(tiny_checkpoint, here / "best.pt")
    monkeypatch.chdir(here)
    result = run_benchmarks(Path("artifacts"), Path("best.pt"), synthetic_data, out_dir=Path("bench"),
                            only=["onnx_fp32", "ptl_fp32"], **FAST)
    rows = _rows(result)
    assert {name: rows[name]["status"] for name in (BASELINE, "onnx_fp32", "ptl_fp32")} == \
        {BASELINE: "baseline", "onnx_fp32": "verified", "ptl_fp32": "verified"}, rows
    assert rows["onnx_fp32"]["top1_agreement"] == 1.0 and (here / "bench" / "report.md").is_file()


def test_report_files_written(happy):
    out = {k: Path(v) for k, v in happy["outputs"].items()}
    md = out["md"].read_text()
    for name in (BASELINE, "ptl_fp32", "torchscript_fp32", "onnx_fp32"):
        assert f"| {name} |" in md
    assert "**Phones**" in md and "**Servers**" in md and "GFLOP/s" in md and "Target" in md
    data = json.loads(out["json"].read_text())
    assert data["machine"]["logical_cores"] >= 1 and data["settings"]["runs"] == 3
    assert [r["name"] for r in csv.DictReader(out["csv"].open())] == [r["name"] for r in happy["rows"]]
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    phone = data["recommendations"]["phone"]
    assert phone["name"] in ("ptl_fp32", "onnx_fp32")
    n = phone["n_images"]  # the pick's agreement in the interval its image count allows: all n agree here
    assert phone["top1_agreement"] == 1.0 and phone["top1_agreement_ci95"] == pytest.approx([0.025 ** (1 / n), 1.0])
    assert f"(95% CI {100 * 0.025 ** (1 / n):.2f}-100.00 on {n} images)" in md
    assert {t["result"] for t in data["targets"]} <= {"PASS", "FAIL", "N/A"}
    ratio = next(r for r in data["runtime_ratios"] if r["artifact"] == "ptl_fp32")
    assert ratio["against"] == "onnx_fp32" and "## Runtime ratios" in md and "| ptl_fp32 | onnx_fp32 |" in md
    ceiling = data["machine"]["gemm_ceiling"]  # measured on this CPU after the workers
    assert ceiling["fp32_gflops"] > 0 and ceiling["int8_gops"] > 0 and "CPU GEMM ceiling at 1 thread" in md
    assert "python -m benchmarks.ratios" in md
    assert all(s is None or s > 0 for s in ratio["ceiling_share"]) and ratio["ceiling_share"][1] is not None


def test_missing_altered_unloadable_and_failed_entries_become_failed_rows(artifacts, tiny_checkpoint,
                                                                          synthetic_data, tmp_path):
    art = tmp_path / "artifacts"
    shutil.copytree(artifacts, art)
    (art / "model.onnx").unlink()
    with open(art / "model.torchscript.pt", "ab") as fh:
        fh.write(b"tampered")
    (art / "junk.ptl").write_bytes(b"not a model at all")
    record(art, _entry(art, "junk_ptl", "ptl", "pytorch-lite", art / "junk.ptl", None))
    record(art, ArtifactEntry(name="executorch_int8", format="pte", precision="int8", runtime="executorch",
                              path=None, status="failed", error="lowering failed: demo"))
    result = run_benchmarks(art, tiny_checkpoint, synthetic_data, out_dir=tmp_path / "rep", **FAST)
    rows = _rows(result)
    assert rows["onnx_fp32"]["status"] == "failed" and "missing" in rows["onnx_fp32"]["reason"]
    assert rows["torchscript_fp32"]["status"] == "failed" and "sha256" in rows["torchscript_fp32"]["reason"]
    assert rows["junk_ptl"]["status"] == "failed" and "lite interpreter cannot load" in rows["junk_ptl"]["reason"]
    assert rows["executorch_int8"]["status"] == "failed" and "demo" in rows["executorch_int8"]["reason"]
    assert rows["ptl_fp32"]["measured"] and rows["ptl_fp32"]["top1_agreement"] == 1.0
    assert rows[BASELINE]["measured"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "sha256 mismatch" in md and "missing" in md


def test_data_with_other_classes_gives_failed_rows(artifacts, tiny_checkpoint, tmp_path):
    other = make_synthetic_dataset(tmp_path / "other", per_class=12, size=32, classes=("a", "b", "c", "d"))
    result = run_benchmarks(artifacts, tiny_checkpoint, other, out_dir=tmp_path / "rep", only=["onnx_fp32"],
                            **FAST)
    rows = _rows(result)
    assert list(rows) == [BASELINE, "onnx_fp32"]
    for r in rows.values():
        assert r["status"] == "failed" and "differ from the model" in r["reason"]
        assert r.get("accuracy") is None and not r["measured"]
    assert "Data problem" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_errors_name_the_flag(tmp_path, tiny_checkpoint, synthetic_data, capsys):
    code = bench_main(["--artifacts", str(tmp_path), "--checkpoint", str(tiny_checkpoint),
                       "--data", str(synthetic_data), "--out", str(tmp_path / "r")])
    assert code == 2 and "--artifacts" in capsys.readouterr().err
    code = bench_main(["--artifacts", str(tmp_path), "--checkpoint", str(tmp_path / "nope.pt"),
                       "--data", str(synthetic_data)])
    assert code == 2


def test_machine_info_and_flop_count(monkeypatch):
    import benchmarks.machine

    m = machine_info()
    assert m["logical_cores"] >= 1 and "torch" in m["libraries"]
    if m["peak_gflops_per_core"]:  # the all-core peak counts the cores the benchmark may use, not the host's
        monkeypatch.setattr(benchmarks.machine, "usable_cores", lambda: 1)
        assert machine_info()["peak_gflops_all_cores"] == m["peak_gflops_per_core"]
    assert resnet18_gflop(224) == pytest.approx(3.64)
    assert resnet18_gflop(112) == pytest.approx(0.91)


def test_gemm_ceiling_measures_both_precisions_on_this_cpu():
    from benchmarks.roofline import gemm_ceiling

    c = gemm_ceiling(shapes=((64, 128, 32), (32, 256, 64)), repeats=2)
    assert c["fp32_gflops"] > 0 and c["int8_gops"] > 0 and c["threads"] == 1
    assert c["int8_over_fp32"] == pytest.approx(c["int8_gops"] / c["fp32_gflops"], abs=0.01)


def test_peak_assumption_knows_half_rate_avx512():
    from benchmarks.machine import flops_per_cycle

    avx512 = {"avx2", "fma", "avx512f"}
    assert flops_per_cycle(avx512, "AuthenticAMD", "25")[0] == 32  # Zen 4: two 256-bit halves
    assert flops_per_cycle(avx512, "GenuineIntel", "6")[0] == 64 and flops_per_cycle({"avx2", "fma"})[0] == 32


def test_ceiling_shares_explain_each_int8_speedup():
    """speedup = (int8 ceiling / fp32 ceiling) x (the int8 file's share of its ceiling / its float file's share)."""
    from benchmarks.summary import runtime_ratios

    def row(name, ms, precision):
        return {"name": name, "precision": precision, "runtime": "onnxruntime", "measured": True,
                "status": "verified", "latency_1t": {"p50_ms": ms}}

    machine = {"machine": "x86_64", "has_vnni": True,
               "gemm_ceiling": {"fp32_gflops": 100.0, "int8_gops": 400.0, "int8_over_fp32": 4.0}}
    ratios = runtime_ratios([row("onnx_fp32", 40.0, "fp32"), row("onnx_int8_static", 12.0, "int8")], machine)
    (r,) = ratios
    share_int8, share_fp32 = r["ceiling_share"]
    assert share_fp32 == pytest.approx(resnet18_gflop(224) / 0.040 / 100.0)
    assert r["value"] == pytest.approx(4.0 * share_int8 / share_fp32)
    assert runtime_ratios([row("onnx_fp32", 40.0, "fp32"), row("onnx_int8_static", 12.0, "int8")],
                          {"machine": "x86_64"})[0]["ceiling_share"] == [None, None]


def test_runtime_ratios_compare_float_with_onnx_runtime_and_int8_with_its_own_float():
    from benchmarks.summary import float_counterpart, runtime_ratios

    def row(name, ms, precision="fp32", runtime="onnxruntime", engine=None):
        return {"name": name, "precision": precision, "runtime": runtime, "engine": engine, "measured": True,
                "status": "verified", "latency_1t": {"p50_ms": ms}}

    rows = [row("onnx_fp32", 30.0), row("onnx_int8_static", 12.0, "int8"), row("ptl_fp32", 36.0, runtime="pytorch-lite"),
            row("ptl_int8", 60.0, "int8", "pytorch-lite", "qnnpack"), row("ptl_int8@x86", 8.0, "int8", "pytorch-lite", "x86"),
            row("executorch_fp32", 33.0, runtime="executorch"), row("litert_fp32", 30.0, runtime="litert"),
            {**row("litert_int8", 9.0, "int8", "litert"), "status": "failed"}]
    vnni = {r["artifact"]: r for r in runtime_ratios(rows, {"machine": "x86_64", "has_vnni": True})}
    assert (vnni["ptl_fp32"]["value"], vnni["ptl_fp32"]["result"]) == (pytest.approx(1.2), "FAIL")  # <= 1.1x
    assert vnni["executorch_fp32"]["result"] == "PASS" and vnni["litert_fp32"]["result"] == "PASS"  # 1.1x, 1.0x
    assert vnni["onnx_int8_static"]["result"] == "FAIL" and vnni["ptl_int8@x86"]["against"] == "ptl_fp32"
    assert vnni["ptl_int8@x86"]["value"] == pytest.approx(4.5) and vnni["ptl_int8@x86"]["result"] == "PASS"
    assert vnni["ptl_int8"]["result"] == "N/A" and "litert_int8" not in vnni  # qnnpack on x86; a failed row
    avx2 = {r["artifact"]: r for r in runtime_ratios(rows, {"machine": "x86_64", "has_vnni": False})}
    assert avx2["onnx_int8_static"]["result"] == "PASS" and "AVX2" in avx2["onnx_int8_static"]["target"]  # 2.5x >= 2x
    assert {r["result"] for r in runtime_ratios(rows, {"machine": "aarch64"}) if r["measure"] == "int8 speedup"} == {"N/A"}
    emulated = {"machine": "x86_64", "has_vnni": True, "int8": {"isa_restricted_by": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}}
    avx2_torch = {r["artifact"]: r for r in runtime_ratios(rows, emulated)}  # torch's kernels limited, ORT's not
    assert avx2_torch["ptl_int8@x86"]["target"].startswith(">= 2.0x") and avx2_torch["onnx_int8_static"]["target"] == ">= 3.6x (VNNI)"
    assert [float_counterpart(n) for n in ("ort_mobile_int8", "onnx_int8_dynamic", "ptl_int8@x86")] == \
        ["ort_mobile_fp32", "onnx_fp32", "ptl_fp32"]


def test_image_file_reads_slices_and_shards_without_loading_the_whole_array(tmp_path):
    from benchmarks.worker import ImageFile

    images = np.random.default_rng(0).random((11, 3, 5, 5), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    f = ImageFile(tmp_path / "images.npy")
    assert f.shape == images.shape and np.array_equal(f[:], images) and np.array_equal(f[3:7], images[3:7])
    assert np.array_equal(f[9:40], images[9:]) and f[11:12].shape == (0, 3, 5, 5)
    shards = [f.shard(k, 3) for k in range(3)]
    for shard, expected in zip(shards, np.array_split(images, 3)):
        assert shard.shape == expected.shape and np.array_equal(shard[:], expected)
        assert np.array_equal(shard[1:2], expected[1:2])
    with pytest.raises(IndexError):
        f[::2]


def test_ratios_time_every_file_taking_turns(artifacts, tiny_checkpoint, tmp_path, capsys):
    from benchmarks.ratios import main as ratios_main

    out = tmp_path / "ratios"
    assert ratios_main(["--artifacts", str(artifacts), "--checkpoint", str(tiny_checkpoint), "--rounds", "3",
                        "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads((out / "ratios.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {BASELINE, "ptl_fp32", "torchscript_fp32", "onnx_fp32"}
    assert all(r["latency_1t"]["runs"] == 3 and r["latency_1t"]["p50_ms"] > 0 for r in rows.values())
    ratio = next(r for r in data["runtime_ratios"] if r["artifact"] == "ptl_fp32")
    assert ratio["value"] == pytest.approx(rows["ptl_fp32"]["latency_1t"]["p50_ms"] / rows["onnx_fp32"]["latency_1t"]["p50_ms"])
    assert "seeded random input" in data["input"] and "| ptl_fp32 | onnx_fp32 |" in (out / "ratios.md").read_text()
    capsys.readouterr()
    assert ratios_main(["--artifacts", str(tmp_path / "none"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "--artifacts" in capsys.readouterr().err
    assert ratios_main(["--artifacts", str(artifacts), "--checkpoint", str(tiny_checkpoint), "--rounds", "0"]) == 2


def test_ratios_report_files_it_cannot_time_and_time_the_rest(artifacts, tiny_checkpoint, tmp_path):
    from benchmarks.ratios import main as ratios_main

    broken = tmp_path / "artifacts"
    shutil.copytree(artifacts, broken)
    (broken / "model.ptl").write_bytes(b"altered after the export")  # sha256 no longer matches the manifest
    (broken / "model.torchscript.pt").write_bytes(b"not a TorchScript archive")
    record(broken, _entry(broken, "torchscript_fp32", "torchscript", "torchscript", broken / "model.torchscript.pt",
                          load_checkpoint(tiny_checkpoint).sha256))  # recorded as it is: it fails only on load
    from dataclasses import replace  # another checkpoint's 64 px file exported into the same folder: a traceback

    ckpt = load_checkpoint(tiny_checkpoint)
    write_onnx(ckpt.build_deploy_model(), replace(ckpt.spec, input_size=64), broken / "model.onnx")
    record(broken, _entry(broken, "onnx_fp32", "onnx", "onnxruntime", broken / "model.onnx", "another checkpoint"))
    out = tmp_path / "ratios"
    assert ratios_main(["--artifacts", str(broken), "--checkpoint", str(tiny_checkpoint), "--rounds", "2",
                        "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads((out / "ratios.json").read_text())
    assert {r["name"] for r in data["rows"]} == {BASELINE}
    assert set(data["not_timed"]) == {"ptl_fp32", "torchscript_fp32", "onnx_fp32"}
    assert data["not_timed"]["torchscript_fp32"].startswith("does not load")
    assert data["not_timed"]["onnx_fp32"].startswith("does not run on this input")
    assert "Not timed: `ptl_fp32`" in (out / "ratios.md").read_text()


def test_train_throughput_times_both_sides_on_the_same_train_split(synthetic_data, tmp_path, capsys):
    """Both sides read the same files (the data has no split: the seeded train split training makes), and
    settings the data cannot serve are one error line (a StopIteration traceback before)."""
    from benchmarks import train_throughput as tt

    cfg = tt.train_config(str(synthetic_data), 8, 0, 32)
    idx = tt.train_index(cfg)
    plain, _ = tt.plain_side(idx, cfg)
    toolkit, _ = tt.toolkit_side(idx, cfg)
    assert len(plain.dataset) == len(toolkit.dataset) < 48
    out = tmp_path / "t.json"
    args = ["--data", str(synthetic_data), "--batch-size", "8", "--workers", "0", "--input-size", "32"]
    assert tt.main(args + ["--batches", "4", "--warmup", "1", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["images_per_s"]) == {"plain_torchvision", "toolkit"}
    assert all(len(r) == 2 and min(r) > 0 for r in result["rounds"].values())
    capsys.readouterr()
    assert tt.main(args + ["--batches", "40", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: the train split has" in err and "--batches" in err and "Traceback" not in err
    for flag in ("--rounds", "--batch-size"):  # ZeroDivisionError and torch's ValueError before
        assert tt.main(["--data", str(synthetic_data), flag, "0"]) == 2
        assert f"error: {flag} must be at least 1, got 0" in capsys.readouterr().err


def test_the_dart_resize_twins_do_what_copy_resize_does():
    """Each twin against values worked out by hand from copyResize's source (image 4.9.2)."""
    from benchmarks.resize_parity import dart_average, dart_linear, dart_nearest

    a = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    assert dart_nearest(a, 2).tolist() == [[0, 20], [80, 100]]  # pixels (0,0), (0,2), (2,0), (2,2)
    assert dart_average(a, 2).tolist() == [[25, 45], [105, 125]]  # the mean of each 2x2 block
    assert dart_linear(a, 2).tolist() == [[0, 20], [80, 100]]  # whole-pixel positions: no blend
    # at x * 4/3: (2, 1) blends 90, 100, 130, 140 to 119.99999999999999 in float64, which toInt() truncates
    assert dart_linear(a, 3).tolist() == [[0, 13, 26], [53, 66, 80], [106, 119, 133]]
    assert dart_linear(np.array([[0, 255]], dtype=np.uint8), 1).tolist() == [[0]]


def test_resize_parity_report_puts_the_toolkits_resize_first(tiny_checkpoint, synthetic_data, tmp_path, capsys):
    from benchmarks.resize_parity import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data), "--images", "4",
                 "--size", "96", "--out", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "resize_parity.json").read_text())
    first, *others = result["rows"]
    assert first["resizer"] == "toolkit (PIL bilinear)" and first["max_gray_levels"] == 0
    assert first["top1_agreement"] == 1.0 and result["images"] == 4 and result["enlarged_to"] == 96
    assert {r["resizer"] for r in others} >= {"Dart image: linear", "Dart image: average", "PIL area"}
    assert max(r["max_gray_levels"] for r in others) > 0
    assert "| Dart image: linear |" in capsys.readouterr().out


def test_resize_parity_leaves_out_an_unreadable_image_and_names_missing_val_images(tiny_checkpoint, synthetic_data,
                                                                                   tmp_path, capsys):
    """An unreadable val image ended the command with PIL's traceback, data without val or test images with
    numpy's 'need at least one array to stack'."""
    from benchmarks.resize_parity import main
    from train.data import labelled_splits

    data = shutil.copytree(synthetic_data, tmp_path / "data")
    val = labelled_splits(data).split("val")
    val[0].path.write_bytes(b"not an image")
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--images", "100", "--size", "64",
                 "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "resize_parity.json").read_text())["images"] == len(val) - 1
    only_train = tmp_path / "only_train"
    shutil.copytree(synthetic_data, only_train / "train")
    assert main(["--checkpoint", str(tiny_checkpoint), "--data", str(only_train), "--out", str(tmp_path / "t")]) == 2
    assert "no val or test images to compare the resizers on" in capsys.readouterr().err


def test_a_quantization_report_subset_says_it_weighs_classes_equally():
    """--max-images draws classes in turn (train.data.seeded_subset): 50 of each class of cxr4's 400/60/300/59 val
    images. The report called it 'stratified', which reads as proportional to the split."""
    from benchmarks.quant_render import _subset
    from train.data import Sample, seeded_subset

    val = [Sample(Path(f"{c}{i}.png"), c) for c, n in enumerate((400, 60, 300, 59)) for i in range(n)]
    picked = seeded_subset(val, 200)
    assert [sum(s.label == c for s in picked) for c in range(4)] == [50, 50, 50, 50]
    said = _subset({"n_images": 200, "split_images": 819})
    assert "classes in turn" in said and "stratified" not in said and _subset({"n_images": 819}) == ""
