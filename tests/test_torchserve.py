"""The TorchServe archive: built from a tiny checkpoint, its handler checked in-process, then served by a
real TorchServe on 127.0.0.1 (token authorization on) and compared with the float PyTorch model."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest

from export.mar import MAR_FILE, MODEL_NAME, export_mar, main as mar_main, reference_probs
from export.serve import TorchServe, check_available, free_ports, read_config, wait_ready, write_serve_config
from train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def encode(mode: str, fmt: str, side: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (side, side) if mode == "L" else (side, side, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


GOOD = [encode(m, f, side, seed) for seed, (m, f, side) in enumerate(
    [("L", "PNG", 32), ("RGB", "PNG", 48), ("L", "JPEG", 64), ("RGB", "JPEG", 40),
     ("L", "PNG", 100), ("RGB", "JPEG", 32)])]
BAD = {"garbage": b"this is not an image \x00\x01\x02", "empty": b"", "truncated jpeg": GOOD[2][:60],
       "bmp (only PNG/JPEG decoders run)": encode("L", "BMP", 32, 0)}


def png16(seed: int, side: int = 40) -> tuple[bytes, bytes]:
    """The same picture as a 16-bit and as an 8-bit grayscale PNG (16-bit value = 8-bit value * 257)."""
    from PIL import Image

    v = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint16)
    out = []
    for arr in (v * 257, v.astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


GOOD.append(png16(99)[0])


def probs_of(body: dict, class_names) -> list[float]:
    return [body["probabilities"][c] for c in class_names]


@pytest.fixture(scope="module")
def archive(tiny_checkpoint, tmp_path_factory, synthetic_index):
    from train.data import seeded_subset

    out = tmp_path_factory.mktemp("mar")
    ckpt = load_checkpoint(tiny_checkpoint)
    [entry] = export_mar(ckpt, out, eval_samples=seeded_subset(synthetic_index.samples, 4))
    return ckpt, out, entry


def test_archive_checked_on_generated_images_is_only_exported(tiny_checkpoint, tmp_path):
    [entry] = export_mar(load_checkpoint(tiny_checkpoint), tmp_path, eval_samples=None)
    assert entry.status == "exported" and "GENERATED" in entry.status_reason
    assert entry.verification["max_prob_diff"] <= TOL and (tmp_path / MAR_FILE).is_file()


def test_real_images_of_other_kinds_are_sent_as_png_not_replaced_by_generated_ones(tiny_checkpoint, synthetic_index,
                                                                                  tmp_path):
    """Eval images as BMP or TIFF (which the toolkit reads): the check sent 8 generated images instead and the
    archive was still recorded as verified on real images. They are sent as the PNG a client would send."""
    from PIL import Image

    from export.mar import sample_payloads
    from train.data import Sample, seeded_subset

    samples = []
    for i, s in enumerate(seeded_subset(synthetic_index.samples, 3)):
        dest = tmp_path / f"{i}.{('bmp', 'tif', 'png')[i]}"
        Image.open(s.path).save(dest)
        samples.append(Sample(dest, s.label))
    payloads, said = sample_payloads(load_checkpoint(tiny_checkpoint), samples)
    assert said == "3 real image files, 2 of them re-encoded as PNG" and payloads[2] == samples[2].path.read_bytes()
    for data, s in zip(payloads, samples):
        assert data.startswith(b"\x89PNG") and np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                                                              np.asarray(Image.open(s.path)))


def test_the_archive_is_built_where_a_killed_worker_s_leftovers_are_cleaned(tiny_checkpoint, tmp_path, monkeypatch):
    """A worker killed mid-build (the export's other job failing, a Ctrl-C) cannot clean up; the export removes
    what atomic writes leave (`.*.partial*`), and the build folder, 86 MB at 224 px, was not named so."""
    import export.mar as mar
    from train.atomic import remove_partials

    seen = []

    def killed(staging, *a, **k):
        seen.append((staging.name, remove_partials(tmp_path)))  # what the export's cleanup would remove
        raise RuntimeError("killed")

    monkeypatch.setattr(mar, "run_archiver", killed)
    [entry] = export_mar(load_checkpoint(tiny_checkpoint), tmp_path, eval_samples=None)
    [(build, removed)] = seen
    assert entry.status == "failed" and build.startswith(".mar-build-") and removed == [build]


def test_archive_is_verified_and_carries_the_spec_code(archive):
    ckpt, out, entry = archive
    assert entry.status == "verified", entry.error
    assert entry.verification["max_prob_diff"] <= TOL and entry.verification["top1_agreement"] == 1.0
    with zipfile.ZipFile(out / MAR_FILE) as zf:
        names = set(zf.namelist())
        assert {"model.pt", "spec.json", "index_to_name.json", "cxr_spec.py", "cxr_errors.py",
                "torchserve_handler.py", "model-config.yaml", "MAR-INF/MANIFEST.json"} <= names
        assert zf.read("cxr_spec.py") == (REPO / "train" / "spec.py").read_bytes()  # one source of truth
        assert zf.read("cxr_errors.py") == (REPO / "train" / "errors.py").read_bytes()
        assert b"batchSize: 8" in zf.read("model-config.yaml")
    assert "without the toolkit" in entry.verification["method"]
    config = read_config(out / "config.properties")
    addresses = [v for k, v in config.items() if k.endswith("_address")]
    assert len(addresses) == 5 and all(a.startswith(("http://127.0.0.1:", "127.0.0.1")) for a in addresses)
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "false"


def test_archive_runs_where_the_toolkit_is_not_installed(archive, tmp_path):
    """A server that runs the .mar has TorchServe, torch and Pillow, not this toolkit. The archived handler
    answers from its own files in a fresh Python where the toolkit cannot be imported; an archive whose code
    still imports the toolkit fails there, naming the module (so the check can catch what a server would)."""
    from export.mar import run_archived_handler

    ckpt, out, _ = archive
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(out / MAR_FILE) as zf:
        zf.extractall(model_dir)
    results = run_archived_handler(model_dir, GOOD[:2])
    assert [status for status, _ in results] == [200, 200]
    got = np.array([probs_of(body, ckpt.spec.class_names) for _, body in results])
    np.testing.assert_allclose(got, reference_probs(ckpt, GOOD[:2]), atol=TOL)

    spec_copy = model_dir / "cxr_spec.py"
    source = spec_copy.read_text(encoding="utf-8")
    assert "\nimport contextlib\n" in source
    spec_copy.write_text(source.replace("\nimport contextlib\n", "\nimport contextlib\nimport train.spec\n"),
                         encoding="utf-8")
    with pytest.raises(RuntimeError, match="without the toolkit.*No module named 'train"):
        run_archived_handler(model_dir, GOOD[:1])


def test_handler_answers_each_request_of_a_mixed_batch(archive, tmp_path):
    """In one batch, bad payloads get 400 and their own message; good ones still get probabilities."""
    from export.torchserve_handler import CxrHandler, request_bytes

    ckpt, out, _ = archive
    with zipfile.ZipFile(out / MAR_FILE) as zf:
        zf.extractall(tmp_path)
    handler = CxrHandler().load(tmp_path)

    class Ctx:
        def __init__(self):
            self.statuses = {}

        def set_response_status(self, code, phrase="", idx=0):
            self.statuses[idx] = code

    batch = [{"body": GOOD[0]}, {"data": bytearray(BAD["garbage"])}, {"body": BAD["empty"]}, GOOD[1],
             {"data": BAD["truncated jpeg"]}, {}]
    ctx = Ctx()
    bodies = handler.handle(batch, ctx)
    assert ctx.statuses == {1: 400, 2: 400, 4: 400, 5: 400}
    assert "no image bytes" in bodies[2]["error"] and "not a PNG or JPEG" in bodies[1]["error"]
    ref = reference_probs(ckpt, [GOOD[0], GOOD[1]])
    got = np.array([probs_of(bodies[0], ckpt.spec.class_names), probs_of(bodies[3], ckpt.spec.class_names)])
    np.testing.assert_allclose(got, ref, atol=TOL)
    assert request_bytes({"data": b"x"}) == b"x" and request_bytes(bytearray(b"y")) == b"y"


def test_16bit_png_is_scaled_not_clipped():
    """Radiographs often come as 16-bit PNG; PIL's convert('L') alone would clip them to white."""
    from export.torchserve_handler import decode_image
    from train.spec import PreprocessSpec

    spec = PreprocessSpec(input_size=40)
    deep, shallow = png16(5)
    np.testing.assert_array_equal(decode_image(deep, spec), decode_image(shallow, spec))


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    assert mar_main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / MAR_FILE).exists()


# --- a real TorchServe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    """A real TorchServe serving the archive. A decoy `torchserve` stands first on PATH while it runs, as
    where another environment's CLI is found first: the server must come from this Python all the same."""
    reason = check_available()
    if reason:
        pytest.skip(reason)
    _, out, _ = archive
    config = write_serve_config(tmp_path_factory.mktemp("conf") / "test.properties", model_store=out,
                                ports=free_ports(), enable_model_api=True)  # the test registers over the API
    ts = TorchServe(out, config, tmp_path_factory.mktemp("ts-work"))
    decoy_dir = tmp_path_factory.mktemp("decoy-bin")
    decoy = decoy_dir / "torchserve"
    decoy.write_text(f"#!/bin/sh\ntouch '{decoy_dir / 'decoy-ran'}'\nexit 1\n")
    decoy.chmod(0o755)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{decoy_dir}{os.pathsep}{old_path}"
    try:
        ts.start(timeout=90)
        ts.register(MAR_FILE)
        wait_ready(ts, MODEL_NAME, timeout=90)
        ts.decoy_ran = decoy_dir / "decoy-ran"
        yield ts
    finally:
        os.environ["PATH"] = old_path
        ts.stop()


def test_a_port_in_use_is_named_before_the_server_starts(archive, tmp_path):
    """TorchServe itself exits at start-up with the cause only in its log; the port is named up front."""
    import socket

    from export.serve import ServeError

    if check_available():
        pytest.skip(check_available())
    _, out, _ = archive
    for key, setting, flag in (("management", "management_address", "--management-port"),
                               ("grpc_inference", "grpc_inference_port", "--grpc-inference-port")):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = write_serve_config(tmp_path / "busy.properties", model_store=out,
                                        ports={**free_ports(), key: port})
            ts = TorchServe(out, config, tmp_path / "work")
            with pytest.raises(ServeError, match=f"127.0.0.1:{port} \\({setting}\\).*already in use.*"
                                                 f"python -m export.mar ... {flag} N\\)"):
                ts.start(timeout=30)
        assert ts.java_pid is None and not (tmp_path / "work").exists()
    # the gRPC ports (another TorchServe's defaults, 7070 and 7071) can be chosen like the others
    import argparse

    from export.mar import _options

    ports = _options(argparse.Namespace(batch_size=8, max_batch_delay=20, workers=1, threads=1, serve_config=None,
                                        enable_model_api=False, inference_port=1, management_port=2,
                                        metrics_port=3, grpc_inference_port=17070, grpc_management_port=17071))["ports"]
    config = read_config(write_serve_config(tmp_path / "chosen.properties", model_store=out, ports=ports))
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("17070", "17071")


@pytest.mark.torchserve
def test_server_and_workers_run_this_python_not_the_first_torchserve_on_path(server):
    assert not server.decoy_ran.exists()
    log = (server.workdir / "logs" / "model_log.log").read_text(encoding="utf-8", errors="replace")
    assert f"Python runtime: {platform.python_version()}" in log


@pytest.mark.torchserve
@pytest.mark.slow
def test_served_probabilities_match_the_float_model(archive, server):
    ckpt, _, _ = archive
    ref = reference_probs(ckpt, GOOD)
    for payload, expected in zip(GOOD, ref):
        status, body = server.predict(MODEL_NAME, payload)
        assert status == 200, body
        np.testing.assert_allclose(probs_of(body, ckpt.spec.class_names), expected, atol=TOL)
        assert body["label"] == ckpt.spec.class_names[int(np.argmax(expected))]


@pytest.mark.torchserve
@pytest.mark.shared
def test_served_real_cxr4_jpegs(archive, server, shared_data):
    ckpt, _, _ = archive
    with open(shared_data / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split") == "val"]
    by_class = {}
    for r in rows:
        by_class.setdefault(r["label"], r["path"])
    payloads = [(shared_data / p).read_bytes() for p in by_class.values()]
    ref = reference_probs(ckpt, payloads)
    for payload, expected in zip(payloads, ref):
        status, body = server.predict(MODEL_NAME, payload)
        assert status == 200, body
        np.testing.assert_allclose(probs_of(body, ckpt.spec.class_names), expected, atol=TOL)


@pytest.mark.torchserve
def test_multipart_upload_like_curl_F(archive, server):
    """`curl -F data=@image.png`: the image arrives as the multipart field 'data'."""
    from export.serve import request

    ckpt, _, _ = archive
    boundary = "cxrboundary7MA4YWxk"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + GOOD[1] + f"\r\n--{boundary}--\r\n".encode()
    status, raw = request(server.inference_port, "POST", f"/predictions/{MODEL_NAME}", body=body,
                          token=server.keys()["inference"], content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, raw
    got = probs_of(json.loads(raw), ckpt.spec.class_names)
    np.testing.assert_allclose(got, reference_probs(ckpt, GOOD[1:2])[0], atol=TOL)


@pytest.mark.torchserve
def test_bad_requests_get_400_and_the_worker_survives(archive, server):
    ckpt, _, _ = archive
    for name, payload in BAD.items():
        status, body = server.predict(MODEL_NAME, payload)
        assert status == 400, (name, body)
        assert body["status"] == 400 and body["error"], name
    status, body = server.predict(MODEL_NAME, GOOD[0])
    assert status == 200
    np.testing.assert_allclose(probs_of(body, ckpt.spec.class_names), reference_probs(ckpt, GOOD[:1])[0], atol=TOL)


@pytest.mark.torchserve
def test_token_authorization_is_on(server):
    status, body = server.predict(MODEL_NAME, GOOD[0], token="not-the-key")
    assert status != 200 and "Token Authorization failed" in str(body)
    from export.serve import request

    status, _ = request(server.management_port, "GET", "/models")  # no token at all
    assert status != 200


@pytest.mark.torchserve
@pytest.mark.slow
def test_concurrent_clients_all_answered_correctly(archive, server):
    """104 requests from 8 clients, with bad payloads mixed in so they share batches with good ones."""
    from benchmarks.serve_load import load_test

    ckpt, _, _ = archive
    payloads = GOOD + [BAD["garbage"]] + GOOD[:3] + [BAD["empty"]]
    ref = dict(zip(range(len(payloads)), [None] * len(payloads)))
    good_idx = [i for i, p in enumerate(payloads) if p in GOOD]
    for i, probs in zip(good_idx, reference_probs(ckpt, [payloads[i] for i in good_idx])):
        ref[i] = probs
    stats = load_test(server, MODEL_NAME, payloads, n_requests=104, clients=8)
    for i, status, body, _ in stats["results"]:
        expected = ref[i % len(payloads)]
        if expected is None:
            assert status == 400 and "error" in body
        else:
            assert status == 200, body
            np.testing.assert_allclose(probs_of(body, ckpt.spec.class_names), expected, atol=TOL)
    print(f"\nTorchServe load: {stats['requests_per_s']:.1f} req/s, p50 {stats['p50_ms']:.0f} ms, "
          f"p99 {stats['p99_ms']:.0f} ms ({stats['n_requests']} requests, {stats['clients']} clients)")


@pytest.mark.torchserve
def test_stop_leaves_no_process_behind(server):
    pids = set(server._pids)
    assert pids, "the server's java and worker processes were not tracked"
    server.stop()
    assert server.leftovers() == []
    workdir = str(server.workdir)
    ours = [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and workdir in " ".join(p.info["cmdline"] or [])]
    assert ours == [] and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                  for p in pids)


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_command_stops_its_server_on_sigterm(archive, tmp_path):
    """`kill`, `timeout` and `docker stop` send SIGTERM, not Ctrl-C: `python -m export.serve` must still stop
    TorchServe (java and workers) instead of leaving it behind on its ports."""
    import signal
    import subprocess
    import sys
    import time

    reason = check_available()
    if reason:
        pytest.skip(reason)
    _, out, _ = archive
    config = write_serve_config(tmp_path / "serve.properties", model_store=out, ports=free_ports(),
                                load_models=MAR_FILE)
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "export.serve", "--model-store", str(out), "--config",
                             str(config), "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def ours() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline", "status"]) if p.pid != proc.pid and
                p.info["status"] != psutil.STATUS_ZOMBIE and str(workdir) in " ".join(p.info["cmdline"] or [])]

    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "to stop" in line:
                break
        assert any("is serving" in x for x in lines), "".join(lines)[-2000:]
        assert ours(), "the server's processes were not found by their work folder"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 10
        while ours() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert ours() == []
    finally:  # a failing run must not leave a server behind either
        for pid in [proc.pid] * (proc.poll() is None) + ours():
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
