"""`python -m export.mar`: a TorchServe archive (`cxr_resnet18.mar`) with the toolkit's own handler.

The archive holds the TorchScript DeployModel (normalization inside), `spec.json`, `index_to_name.json`,
`cxr_spec.py` and `cxr_errors.py` (byte-for-byte copies of `train/spec.py` and the `train/errors.py` it
imports: one source of truth for decoding and resizing, and no toolkit needed on the server),
`model-config.yaml` (batching, workers) and `torchserve_handler.py`. Beside it goes a `config.properties`
that binds every TorchServe endpoint to 127.0.0.1 and keeps token authorization on.

Verification runs the shipped handler on the unpacked archive the way a TorchServe worker does (a fresh
Python, the archive folder on its path, the toolkit's packages unimportable) against the float model;
`tests/test_torchserve.py` then serves the archive in a real TorchServe.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.common import reference_logits, write_proven
from export.manifest import ArtifactEntry, record
from export.metadata import METADATA_FILE, embedded_metadata, from_json
from export.registry import variant
from export.serve import DEFAULT_PORTS, LISTENING, port_flag
from train.atomic import write_json, write_text
from train import spec as spec_module
from train.checkpoint import Checkpoint
from train.cpu import cpu_description
from train.data import Sample, images_origin
from train.errors import cli_errors
from train.metrics import compare_logits
from train.model import channels_last

log = logging.getLogger(__name__)

ENTRY_NAME = "torchserve_mar"
MAR_FILE = variant(ENTRY_NAME).file
MODEL_NAME = MAR_FILE.removesuffix(".mar")  # torch-model-archiver names the file after the model
HANDLER_SRC = Path(__file__).with_name("torchserve_handler.py")
SPEC_SRC = Path(spec_module.__file__)  # shipped byte for byte as cxr_spec.py
ERRORS_SRC = SPEC_SRC.with_name("errors.py")  # what cxr_spec.py imports, shipped as cxr_errors.py
ARCHIVE_CODE = {"cxr_spec.py": SPEC_SRC, "cxr_errors.py": ERRORS_SRC}
TOOLKIT_PACKAGES = ("train", "export", "quantize", "benchmarks", "mobile_assets")
PROB_TOLERANCE = 1e-4


def script_model(ckpt: Checkpoint) -> tuple[torch.jit.ScriptModule, str]:
    """TorchScript of the DeployModel, through the one scripting path (export.torchscript)."""
    model = channels_last(ckpt.build_deploy_model())
    example = torch.rand(ckpt.spec.input_shape)
    from export.torchscript import script_or_trace

    return script_or_trace(model, example)


def model_config_yaml(batch_size: int, max_batch_delay_ms: int, workers: int, threads: int | None) -> str:
    """model-config.yaml: TorchServe reads batching and worker counts from it at registration."""
    lines = [f"minWorkers: {workers}", f"maxWorkers: {workers}", f"batchSize: {batch_size}",
             f"maxBatchDelay: {max_batch_delay_ms}", "responseTimeout: 120"]
    if threads:
        lines += ["handler:", f"  threads: {threads}"]
    return "\n".join(lines) + "\n"


def stage_files(ckpt: Checkpoint, staging: Path, *, batch_size: int, max_batch_delay_ms: int,
                workers: int, threads: int | None) -> dict[str, Any]:
    """Write everything the archive holds into `staging`; returns what was chosen (for the manifest)."""
    module, how = script_model(ckpt)
    with warnings.catch_warnings():  # "torch.jit.save is deprecated": the README says so once
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(staging / "model.pt"))
    write_json(staging / "spec.json", ckpt.spec.to_dict())
    write_json(staging / "index_to_name.json", {str(i): c for i, c in enumerate(ckpt.spec.class_names)})
    meta = embedded_metadata(ckpt, ENTRY_NAME)
    write_json(staging / METADATA_FILE, meta)
    for name, src in ARCHIVE_CODE.items():
        shutil.copyfile(src, staging / name)
    shutil.copyfile(HANDLER_SRC, staging / HANDLER_SRC.name)
    write_text(staging / "model-config.yaml", model_config_yaml(batch_size, max_batch_delay_ms, workers, threads))
    return {"torchscript": how, "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay_ms,
            "workers": workers, "threads": threads, "handler": HANDLER_SRC.name, "embedded_metadata": meta}


def read_metadata(path: Path) -> dict[str, Any] | None:
    with zipfile.ZipFile(path) as zf:
        return from_json(zf.read(METADATA_FILE)) if METADATA_FILE in zf.namelist() else None


def describe(path: Path) -> dict[str, Any]:
    """The archive's own manifest (model name, version, handler) and its files."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json")) if "MAR-INF/MANIFEST.json" in names else {}
    return {"model": manifest.get("model", {}), "archiver_version": manifest.get("archiverVersion"),
            "files": sorted(names)}


def run_archiver(staging: Path, export_dir: Path, version: str) -> Path:
    """torch-model-archiver in a subprocess with a private TMPDIR (it stages in $TMPDIR/<model name>,
    which concurrent builds would otherwise share)."""
    tmp = staging / "tmp"
    tmp.mkdir(exist_ok=True)
    export_dir.mkdir(exist_ok=True)
    extra = ",".join(str(staging / f) for f in ("spec.json", "index_to_name.json", *ARCHIVE_CODE, METADATA_FILE))
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", MODEL_NAME,
           "--serialized-file", str(staging / "model.pt"), "--handler", str(staging / HANDLER_SRC.name),
           "--extra-files", extra, "--config-file", str(staging / "model-config.yaml"),
           "--version", version, "--export-path", str(export_dir), "--force"]
    proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True,
                          timeout=600)
    mar = export_dir / MAR_FILE
    if proc.returncode != 0 or not mar.is_file():
        lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
        raise RuntimeError(f"torch-model-archiver failed (exit {proc.returncode}): {lines[-1][:500]}")
    return mar


def sample_payloads(ckpt: Checkpoint, eval_samples: list[Sample] | None) -> tuple[list[bytes], str]:
    """Image bytes to verify with: the eval images, PNG/JPEG files as they are and the other kinds the toolkit
    reads (BMP, TIFF, GIF, WebP) as a client would send them, re-encoded as PNG; without eval images, generated
    PNG/JPEG (grayscale and RGB, several sizes), labelled as generated."""
    files = [Path(s.path) for s in eval_samples or []]
    if files:
        as_is = [f for f in files if f.suffix.lower() in (".png", ".jpg", ".jpeg")]
        payloads = [f.read_bytes() if f in as_is else _png_bytes(f) for f in files]
        again = f", {len(files) - len(as_is)} of them re-encoded as PNG" if len(as_is) < len(files) else ""
        return payloads, f"{len(files)} real image files{again}"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, (mode, fmt) in enumerate([("L", "PNG"), ("RGB", "PNG"), ("L", "JPEG"), ("RGB", "JPEG")] * 2):
        side = ckpt.spec.input_size * (1 + i % 3)
        shape = (side, side) if mode == "L" else (side, side, 3)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out, f"{len(out)} GENERATED random PNG/JPEG images (grayscale and RGB; no --data given)"


def _png_bytes(path: Path) -> bytes:
    """An image the server would refuse (it reads PNG and JPEG) as the PNG a client would send instead."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        img = spec_module.upright(img)
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            img = spec_module.to_gray8(img)  # float or 32-bit: the 8-bit gray the model reads
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue()


def reference_probs(ckpt: Checkpoint, payloads: list[bytes]) -> np.ndarray:
    """Softmax of the float DeployModel on the toolkit's own decoding (train.spec), the gold standard."""
    from PIL import Image

    from train.spec import gray_to_unit_array, to_gray_resized

    arrays = []
    for data in payloads:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arrays.append(gray_to_unit_array(to_gray_resized(img, ckpt.spec)))
    logits = reference_logits(ckpt, np.stack(arrays))  # the export's cached reference when the decoding agrees
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


# What a TorchServe worker on a server does with the unpacked archive, where the toolkit is not installed:
# import the handler from the archive folder and answer requests. Run by a fresh `python -I`, with the
# toolkit's packages made unimportable, so an archive that still needs the toolkit fails here, not in
# production. argv: archive folder, JSON list of payload files, JSON list of hidden packages, result file.
_WORKER = """
import importlib, importlib.abc, json, sys
model_dir, payload_files, hidden, result_file = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError("No module named %r (the toolkit is not installed on the server)" % name,
                                      name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.path.insert(0, model_dir)
handler = importlib.import_module("torchserve_handler")
payloads = [open(f, "rb").read() for f in payload_files]
results = handler.CxrHandler().load(model_dir).infer(payloads)
with open(result_file, "w", encoding="utf-8") as fh:
    json.dump(results, fh)
"""


def run_archived_handler(model_dir: Path, payloads: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
    """(HTTP status, JSON body) per payload from the archive's handler, run as a server's worker runs it."""
    work = Path(tempfile.mkdtemp(prefix="handler-run-", dir=model_dir.parent))
    try:
        files = []
        for i, data in enumerate(payloads):
            files.append(str(work / f"{i}.bin"))
            Path(files[-1]).write_bytes(data)
        result_file = work / "results.json"
        proc = subprocess.run([sys.executable, "-I", "-c", _WORKER, str(model_dir), json.dumps(files),
                               json.dumps(TOOLKIT_PACKAGES), str(result_file)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not result_file.is_file():
            lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
            raise RuntimeError(f"the archived handler failed in a fresh Python without the toolkit "
                               f"(exit {proc.returncode}): {lines[-1][:500]}")
        return [(status, body) for status, body in json.loads(result_file.read_text(encoding="utf-8"))]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_archive(mar: Path, ckpt: Checkpoint, payloads: list[bytes], inputs: str = "") -> dict[str, Any]:
    """Unpack the archive and run its handler, with its shipped cxr_spec.py, on `payloads`."""
    with tempfile.TemporaryDirectory(prefix="mar-verify-") as tmp:
        model_dir = Path(tmp) / "model"
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(model_dir)
        results = run_archived_handler(model_dir, payloads)
    bad = [body for status, body in results if status != 200]
    if bad:
        raise RuntimeError(f"the archived handler rejected verification images: {bad[:2]}")
    names = ckpt.spec.class_names
    got = np.array([[body["probabilities"][c] for c in names] for _, body in results], dtype=np.float64)
    ref = reference_probs(ckpt, payloads)
    figures = compare_logits(np.log(ref), np.log(np.clip(got, 1e-30, None)))
    figures.update(method="archived handler run on the unpacked .mar in a fresh Python without the toolkit "
                          "vs float DeployModel (log-probabilities compared as logits)", inputs=inputs,
                   max_prob_diff=float(np.abs(ref - got).max()), tolerance=PROB_TOLERANCE)
    return figures


def export_mar(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
               calib_samples: list[Sample] | None = None, batch_size: int = 8, max_batch_delay_ms: int = 20,
               workers: int = 1, threads: int | None = 1, version: str = "1.0",
               serve_config: Path | None = None, ports: dict[str, int] | None = None,
               enable_model_api: bool = False) -> list[ArtifactEntry]:
    """Build, verify and record `cxr_resnet18.mar`, and write its TorchServe config. `calib_samples`
    is unused (float model); it is accepted so every exporter has the same signature."""
    from export.serve import write_serve_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payloads, inputs = sample_payloads(ckpt, eval_samples)
    details: dict[str, Any] = {}

    def write(part: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=".mar-build-", suffix=".partial", dir=out_dir) as tmp:
            staging = Path(tmp)
            details.update(stage_files(ckpt, staging, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms,
                                       workers=workers, threads=threads))
            shutil.move(str(run_archiver(staging, staging / "export", version)), part)
        return details

    def prove(part: Path) -> dict[str, Any]:
        figures = verify_archive(part, ckpt, payloads, inputs)
        figures.update(inputs_origin=images_origin(eval_samples) if eval_samples else "generated",
                       runtime="torchserve handler", engine=None, machine=cpu_description())
        if not figures["max_prob_diff"] <= PROB_TOLERANCE:
            raise RuntimeError(f"the archived handler's probabilities differ from the float model by "
                               f"{figures['max_prob_diff']:.2e} > {PROB_TOLERANCE}")
        return figures

    entry = write_proven(ckpt, out_dir, ENTRY_NAME, write=write, prove=prove)
    if entry.status != "failed":
        config = write_serve_config(serve_config or out_dir / "config.properties", model_store=out_dir,
                                    ports=ports, enable_model_api=enable_model_api, load_models=MAR_FILE)
        entry.details.update(serve_config=str(config), model_name=MODEL_NAME, model_version=version)
        record(out_dir, entry)
    return [entry]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from export.common import ExportError

    for flag, least in (("batch_size", 1), ("workers", 1), ("threads", 1), ("max_batch_delay", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise ExportError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    ports = {name: getattr(args, f"{name}_port") for name in LISTENING}
    return {"batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay, "workers": args.workers,
            "threads": args.threads, "serve_config": args.serve_config, "ports": ports,
            "enable_model_api": args.enable_model_api}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    from export.cli import add_common_args, run_cli

    p = argparse.ArgumentParser(prog="python -m export.mar", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--serve-config", type=Path, default=None,
                   help="where to write the TorchServe config.properties (default: OUT/config.properties)")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe server-side batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=20, help="ms TorchServe waits to fill a batch (default 20)")
    p.add_argument("--workers", type=int, default=1, help="TorchServe worker processes for the model (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1: more threads than free cores is many times "
                        "slower, and batching already keeps the core busy)")
    for name in LISTENING:  # --inference-port ... --grpc-management-port
        p.add_argument(port_flag(name), type=int, default=DEFAULT_PORTS[name],
                       help=f"127.0.0.1 port of the {name.replace('grpc_', 'gRPC ')} API "
                            f"(default {DEFAULT_PORTS[name]})")
    p.add_argument("--enable-model-api", action="store_true",
                   help="allow registering/deleting models over the management API (off by default)")
    return run_cli(p, export_mar, argv, _options)


if __name__ == "__main__":
    sys.exit(main())
