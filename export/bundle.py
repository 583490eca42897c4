"""The Flutter asset bundle: models, labels, manifest.json, test vectors and the app developers' README.

Written from the artifact manifest (artifacts.json), never from a directory listing. Everything is staged in
a hidden temporary folder inside the bundle folder (same file system, and covered by its .gitignore), validated against mobile_assets/manifest.schema.json, then moved
into place with os.replace, manifest.json last: a folder holds a bundle exactly when it holds manifest.json,
and an interrupted run leaves the old bundle (failure before the move) or no manifest.json (during it).
The bundle folder may also hold source files (the default mobile_assets/ does); only GENERATED names are
ever replaced or removed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.manifest import ArtifactEntry, entries, verify_file
from export.runners import get_runner
from train.atomic import sha256_file, size_bytes
from train.checkpoint import Checkpoint
from train.data import Sample, seeded_subset
from train.errors import ToolkitError
from train.spec import load_unit_image

log = logging.getLogger(__name__)

BUNDLE_SCHEMA_VERSION = 1
MODEL_FILES = {"ptl_fp32": "model.ptl", "ptl_int8": "model_int8.ptl",
               "executorch_fp32": "model.pte", "executorch_int8": "model_int8.pte"}
GENERATED = (*MODEL_FILES.values(), "labels.txt", "test_vectors", "README.md", "manifest.json")
NOTICE = ("RESEARCH SOFTWARE, NOT A MEDICAL DEVICE. This model has not been validated for clinical use and "
          "must not be used to diagnose, treat or triage patients. Its training data confounds diagnosis with "
          "image source, so its accuracy on other images is unknown.")


class BundleError(ToolkitError, RuntimeError):
    """A bundle that cannot be written as asked; the message names the folder or artifact."""


def _check_target(bundle_dir: Path, force: bool) -> None:
    if bundle_dir.exists() and not bundle_dir.is_dir():
        raise BundleError(f"--out {bundle_dir} is a file, not a folder; choose a folder for the bundle")
    if (bundle_dir / "manifest.json").exists() and not force:
        raise BundleError(f"--out {bundle_dir} already holds a bundle (manifest.json); pass --force to "
                          f"replace it or choose another --out")


def _stage(bundle_dir: Path) -> Path:
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging.", suffix=".partial", dir=bundle_dir))
    except OSError as err:
        raise BundleError(f"cannot write the bundle to --out {bundle_dir}: {err.strerror or err}; choose a "
                          f"writable folder") from err


def pick_models(artifacts_dir: Path, ckpt: Checkpoint, include: Sequence[str] | None,
                allow_unverified: bool = False) -> list[ArtifactEntry]:
    """Model entries of *this* checkpoint verified on real images, with their files unaltered.
    `allow_unverified` (the SYNTHETIC demo only) also takes 'exported' entries, and the bundle says so."""
    accepted = ("verified", "exported") if allow_unverified else ("verified",)
    chosen = []
    for e in entries(artifacts_dir):
        if e.name not in MODEL_FILES or (include is not None and e.name not in include):
            continue
        if e.status not in accepted:
            log.warning("skipping %s: status %s (%s)", e.name, e.status, e.error or e.status_reason)
        elif e.source_checkpoint_sha256 != ckpt.sha256:
            log.warning("skipping %s: exported from another checkpoint", e.name)
        else:
            verify_file(artifacts_dir, e)
            chosen.append(e)
    if not any(e.name == "ptl_fp32" for e in chosen):
        raise BundleError(f"{artifacts_dir}/artifacts.json has no ptl_fp32 entry verified on real images for "
                          f"checkpoint {ckpt.path}; run `python -m export.lite --checkpoint {ckpt.path} --data "
                          f"REAL_IMAGES` first (a bundle only ships files verified on real X-rays)")
    return sorted(chosen, key=lambda e: list(MODEL_FILES).index(e.name))


def _run(entry: ArtifactEntry, path: Path, x: np.ndarray) -> np.ndarray:
    previous = torch.backends.quantized.engine
    try:
        return get_runner(entry.runtime, engine=entry.engine).load(path).run(x)
    finally:
        torch.backends.quantized.engine = previous


def _vector_images(ckpt: Checkpoint, eval_samples: Sequence[Sample] | None, n: int, tmp: Path) -> list[tuple[Path, str]]:
    if eval_samples:
        return [(s.path, f"{ckpt.spec.class_names[s.label]} image from --data") for s in seeded_subset(eval_samples, n)]
    from train.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp, per_class=1, size=ckpt.spec.input_size * 2, seed=7,
                                  classes=ckpt.spec.class_names, layout="plain")
    files = sorted(p for p in root.rglob("*.png"))[:n]
    return [(p, "SYNTHETIC generated image (no --data given)") for p in files]


def write_test_vectors(stage: Path, ckpt: Checkpoint, models: list[ArtifactEntry],
                       eval_samples: Sequence[Sample] | None, n: int) -> dict[str, Any]:
    """PNG inputs, their outside-the-model preprocessing as little-endian float32, expected logits per model."""
    from PIL import Image

    from train.atomic import write_json

    out = stage / "test_vectors"
    out.mkdir()
    vectors, batch = [], []
    with tempfile.TemporaryDirectory(prefix="cxr-vectors-") as tmp:
        for i, (src, source) in enumerate(_vector_images(ckpt, eval_samples, n, Path(tmp))):
            name = f"vector_{i:02d}"
            with Image.open(src) as img:
                img.load()
                (img if img.mode in ("L", "RGB", "RGBA", "I;16") else img.convert("RGB")).save(out / f"{name}.png")
            x = load_unit_image(out / f"{name}.png", ckpt.spec)[None]
            (out / f"{name}.bin").write_bytes(x.astype("<f4").tobytes())
            batch.append(x[0])
            vectors.append({"name": name, "png": f"test_vectors/{name}.png", "input": f"test_vectors/{name}.bin",
                            "shape": list(x.shape), "dtype": "float32", "byte_order": "little", "source": source})
    x = np.stack(batch)
    expected: dict[str, Any] = {
        "reference (PyTorch eager float)": get_runner("torch-eager").use_module(ckpt.build_deploy_model()).run(x)}
    for e in models:
        try:
            expected[MODEL_FILES[e.name]] = _run(e, stage / MODEL_FILES[e.name], x)
        except Exception as err:  # e.g. no ExecuTorch runtime here: say so instead of failing the bundle
            expected[MODEL_FILES[e.name]] = f"not computed: {type(err).__name__}: {err}"
    logits = {k: (v if isinstance(v, str) else {vec["name"]: [float(z) for z in row] for vec, row in zip(vectors, v)})
              for k, v in expected.items()}
    write_json(out / "expected_logits.json", {"classes": list(ckpt.spec.class_names), "logits": logits})
    return {"expected_logits": "test_vectors/expected_logits.json", "vectors": vectors,
            "tolerance": {"model.ptl": 1e-4, "model_int8.ptl": "same engine: 1e-3; other engines may differ",
                          "app decoding": "compare your float input with the .bin first (max abs diff <= 1/255)"}}


def evaluate_models(stage: Path, ckpt: Checkpoint, models: list[ArtifactEntry],
                    samples: Sequence[Sample], batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall of each bundled .ptl, run from the bundle in the lite interpreter."""
    from sklearn.metrics import f1_score, recall_score
    from tqdm import tqdm

    from export.runners import compare_logits
    from train.data import load_batch

    y = np.array([s.label for s in samples])
    names = ckpt.spec.class_names
    result: dict[str, Any] = {"n_images": len(samples), "note": "computed on the bundled .ptl files"}
    logits = {}
    for e in (m for m in models if m.name in ("ptl_fp32", "ptl_int8")):
        previous = torch.backends.quantized.engine
        try:
            runner = get_runner(e.runtime, engine=e.engine).load(stage / MODEL_FILES[e.name])
            outs = [runner.run(load_batch(samples[i:i + batch_size], ckpt.spec)) for i in
                    tqdm(range(0, len(samples), batch_size), desc=f"evaluating {e.name}", unit="batch", leave=False)]
        finally:
            torch.backends.quantized.engine = previous
        logits[e.name] = np.concatenate(outs)
        pred = logits[e.name].argmax(1)
        labels = list(range(len(names)))
        result["float" if e.name == "ptl_fp32" else "int8"] = {
            "model": MODEL_FILES[e.name], "engine": e.engine, "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "per_class_recall": dict(zip(names, map(float, recall_score(y, pred, labels=labels, average=None,
                                                                        zero_division=0))))}
    if len(logits) == 2:
        result["int8_vs_float"] = compare_logits(logits["ptl_fp32"], logits["ptl_int8"])
    return result


def _model_record(e: ArtifactEntry, stage: Path) -> dict[str, Any]:
    d = e.details
    return {"name": e.name, "file": MODEL_FILES[e.name], "format": e.format, "precision": e.precision,
            "runtime": e.runtime, "status": e.status, "status_reason": e.status_reason,
            "quantized_engine": e.engine if e.precision == "int8" else None,
            "recommended_runtime_engine": d.get("recommended_runtime_engine"),
            "bytecode_version": d.get("bytecode_version"), "conversion": d.get("conversion"),
            "optimize_for_mobile": d.get("optimize_for_mobile"), "operators": d.get("operators"),
            "sha256": sha256_file(stage / MODEL_FILES[e.name]), "size_bytes": size_bytes(stage / MODEL_FILES[e.name]),
            "verification": e.verification}


def build_manifest(stage: Path, ckpt: Checkpoint, models: list[ArtifactEntry], vectors: dict[str, Any],
                   evaluation: dict[str, Any] | None, model_name: str | None, model_version: str | None) -> dict:
    spec = ckpt.spec
    fp32 = next(e for e in models if e.name == "ptl_fp32")
    int8 = next((e for e in models if e.name == "ptl_int8"), None)
    files = [{"path": str(p.relative_to(stage)), "sha256": sha256_file(p), "size_bytes": size_bytes(p)}
             for p in sorted(stage.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    return {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "notice": NOTICE,
        "model": {"name": model_name or f"cxr-{ckpt.arch}-{spec.num_classes}class",
                  "version": model_version or (ckpt.sha256 or "unknown")[:12], "architecture": ckpt.arch,
                  "source_checkpoint_sha256": ckpt.sha256,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        "classes": list(spec.class_names),
        "labels_file": "labels.txt",
        "input": {"shape": list(spec.input_shape), "layout": "NCHW", "dtype": "float32", "value_range": [0.0, 1.0],
                  "colour": "RGB: the grayscale radiograph repeated in all 3 channels",
                  "resize": {"method": spec.resize, "size": [spec.input_size, spec.input_size],
                             "order": "decode -> grayscale -> resize -> repeat to 3 channels -> divide by 255"},
                  "normalization_inside_model": True, "contrast_stretch_inside_model": spec.contrast_stretch,
                  "mean_std_inside_model": {"mean": list(spec.mean), "std": list(spec.std)},
                  "app_must_pass_mean": [0.0, 0.0, 0.0], "app_must_pass_std": [1.0, 1.0, 1.0]},
        "outputs": {"name": "logits", "shape": [1, spec.num_classes], "dtype": "float32",
                    "order": "same as classes / labels.txt", "postprocess": "apply softmax for probabilities"},
        "runtime": {"torch_version": str(torch.__version__), "bytecode_version": fp32.details.get("bytecode_version"),
                    "optimize_for_mobile": fp32.details.get("optimize_for_mobile"),
                    "int8_engine": int8.engine if int8 else None,
                    "recommended_runtime_engine": (int8.details.get("recommended_runtime_engine") if int8 else None)},
        "models": [_model_record(e, stage) for e in models],
        "files": files,
        "test_vectors": vectors,
        "evaluation": evaluation,
    }


def _replace(src: Path, dest: Path) -> None:
    """os.replace for files and folders; an existing folder is moved aside first (rename cannot overwrite it)."""
    trash = None
    if dest.is_dir() and not dest.is_symlink():
        trash = dest.with_name(f".{dest.name}.old.partial")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dest, trash)
    os.replace(src, dest)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def commit(stage: Path, bundle_dir: Path) -> None:
    """Move staged files into place, manifest.json last; stale generated files of an old bundle go."""
    marker = bundle_dir / "manifest.json"
    marker.unlink(missing_ok=True)  # from here until the end, the folder does not claim to hold a bundle
    staged = {p.name for p in stage.iterdir()}
    for name in GENERATED:
        if name == "manifest.json":
            continue
        if name in staged:
            _replace(stage / name, bundle_dir / name)
        elif name != "README.md" and (bundle_dir / name).exists():
            stale = bundle_dir / name
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    os.replace(stage / "manifest.json", marker)


def check_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Re-read a bundle: schema-valid manifest and every listed file present with its sha256."""
    import json

    from mobile_assets import validate_manifest

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    validate_manifest(manifest)
    for f in manifest["files"]:
        if sha256_file(bundle_dir / f["path"]) != f["sha256"]:
            raise BundleError(f"{bundle_dir / f['path']}: sha256 differs from manifest.json")
    return manifest


def write_bundle(artifacts_dir: str | Path, bundle_dir: str | Path, ckpt: Checkpoint, *,
                 eval_samples: Sequence[Sample] | None = None, force: bool = False,
                 include: Sequence[str] | None = None, test_vectors: int = 3, model_name: str | None = None,
                 model_version: str | None = None, metrics_samples: Sequence[Sample] | None = None,
                 eval_info: dict[str, Any] | None = None, allow_unverified: bool = False) -> Path:
    """Write the Flutter bundle for `ckpt` from `artifacts_dir`. `eval_samples` (real images) give the
    test-vector images and, unless `metrics_samples` is given, the evaluation metrics."""
    from mobile_assets import APP_README_PATH, validate_manifest
    from train.atomic import write_json, write_text

    artifacts_dir, bundle_dir = Path(artifacts_dir), Path(bundle_dir)
    _check_target(bundle_dir, force)
    models = pick_models(artifacts_dir, ckpt, include, allow_unverified)
    stage = _stage(bundle_dir)
    try:
        for e in models:
            shutil.copyfile(artifacts_dir / e.path, stage / MODEL_FILES[e.name])
        write_text(stage / "labels.txt", "".join(f"{c}\n" for c in ckpt.spec.class_names))
        vectors = write_test_vectors(stage, ckpt, models, eval_samples, test_vectors)
        metric_set = metrics_samples if metrics_samples is not None else eval_samples
        evaluation = evaluate_models(stage, ckpt, models, list(metric_set)) if metric_set else None
        if evaluation is not None:
            evaluation.update(eval_info or {})
        shutil.copyfile(APP_README_PATH, stage / "README.md")
        manifest = build_manifest(stage, ckpt, models, vectors, evaluation, model_name, model_version)
        validate_manifest(manifest)
        write_json(stage / "manifest.json", manifest)
        commit(stage, bundle_dir)
    except OSError as err:
        raise BundleError(f"writing the bundle to {bundle_dir} failed: {err}") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote the Flutter bundle to %s (%d models)", bundle_dir, len(models))
    return bundle_dir
