"""The Flutter asset bundle: models, labels, manifest.json, test vectors and the app developers' README.

Written from the artifact manifest (artifacts.json), never from a directory listing. Everything is staged in
a hidden temporary folder inside the bundle folder (same file system, and covered by its .gitignore), validated against mobile_assets/manifest.schema.json, then moved
into place with os.replace, manifest.json last: a folder holds a bundle exactly when it holds manifest.json,
and an interrupted run leaves the old bundle (failure before the move) or no manifest.json (during it).
The bundle folder may also hold source files (the default mobile_assets/ does); only generated_names() are
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

from export.manifest import ArtifactEntry, entries, read_source, verify_file
from export.metadata import RESEARCH_NOTICE
from export.registry import bundle_variants, variant
from mobile_assets import APP_README_PATH, validate_manifest
from mobile_assets.vectors import evaluate_models, write_test_vectors
from train.atomic import check_writable_dir, require_free_space, sha256_file, size_bytes
from train.data import Sample
from train.errors import ToolkitError
from train.spec import PreprocessSpec

log = logging.getLogger(__name__)

BUNDLE_SCHEMA_VERSION = 1
PLAY_BASE_MODULE_BYTES = 200_000_000  # Google Play's limit on an app's base module (compressed download)
DEFLATED_MODEL_RATIO = 0.93  # float ResNet-18 files deflate to 0.93 of their size (int8 ones to 0.86-0.90)
FIXED = ("labels.txt", "test_vectors", "README.md", "manifest.json")
NOTICE = RESEARCH_NOTICE  # the same notice every model file carries inside (export.metadata)


def generated_names() -> tuple[str, ...]:
    """Every name a bundle writes (model files from the registry): the only names ever replaced or removed."""
    return (*(v.file for v in bundle_variants().values()), *FIXED)


class BundleError(ToolkitError, RuntimeError):
    """A bundle that cannot be written as asked; the message names the folder or artifact."""


def check_target(bundle_dir: Path, force: bool, artifacts_dir: Path) -> None:
    """Called before minutes of export, so a bundle that cannot be written fails first. The export folder is
    refused: a bundle replaces the files of its names there (model.ptl, model.tflite, ...), which are the
    exported models artifacts.json lists."""
    if bundle_dir.exists() and not bundle_dir.is_dir():
        raise BundleError(f"--out {bundle_dir} is a file, not a folder; choose a folder for the bundle")
    if _same_folder(bundle_dir, artifacts_dir) or (bundle_dir / "artifacts.json").exists():
        raise BundleError(f"--out {bundle_dir} is an export folder (artifacts.json): a bundle there would replace or "
                          f"remove the exported models it lists; write the bundle to a folder of its own, e.g. your "
                          f"app's assets/cxr/")
    if (bundle_dir / "manifest.json").exists() and not force:
        raise BundleError(f"--out {bundle_dir} already holds a bundle (manifest.json); pass --force to "
                          f"replace it or choose another --out")
    check_writable_dir(bundle_dir)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _stage(bundle_dir: Path) -> Path:
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging.", suffix=".partial", dir=bundle_dir))
    except OSError as err:
        raise BundleError(f"cannot write the bundle to --out {bundle_dir}: {err.strerror or err}; choose a "
                          f"writable folder") from err


def pick_models(artifacts_dir: Path, checkpoint_sha256: str | None, include: Sequence[str] | None,
                allow_unverified: bool = False, runtime: str | None = None) -> list[ArtifactEntry]:
    """Bundled entries (export.registry: `bundle`, for one Flutter runtime package or all) of *this* checkpoint
    verified on real images, with their files unaltered. `allow_unverified` (the SYNTHETIC demo only) also takes
    'exported' entries, and the bundle says so. The first float model in registry order is the primary one."""
    accepted = ("verified", "exported") if allow_unverified else ("verified",)
    bundled = bundle_variants(runtime)
    chosen = []
    for e in entries(artifacts_dir):
        if e.name not in bundled or (include is not None and e.name not in include):
            continue
        if e.status not in accepted:
            log.warning("skipping %s: status %s (%s)", e.name, e.status, e.error or e.status_reason)
        elif e.source_checkpoint_sha256 != checkpoint_sha256:
            log.warning("skipping %s: exported from another checkpoint", e.name)
        else:
            verify_file(artifacts_dir, e)
            chosen.append(e)
    floats = [n for n, v in bundled.items() if not v.is_int8]
    if not any(e.name in floats for e in chosen):
        wanted = " or ".join(floats) or f"(no registered file for runtime {runtime!r})"
        raise BundleError(f"{artifacts_dir}/artifacts.json has no {wanted} entry verified on real images for "
                          f"checkpoint {str(checkpoint_sha256)[:12]}; run `python -m export.lite --checkpoint CKPT "
                          f"--data REAL_IMAGES` (or `python -m export` for the other formats) first (a bundle only "
                          f"ships files verified on real X-rays)")
    chosen.sort(key=lambda e: list(bundled).index(e.name))
    primary = next(e for e in chosen if e.name in floats)
    return [primary] + [e for e in chosen if e is not primary]


def _model_record(e: ArtifactEntry, stage: Path) -> dict[str, Any]:
    d, v = e.details, variant(e.name)
    return {"name": e.name, "file": v.file, "format": e.format, "precision": e.precision, "runtime": e.runtime,
            "app_runtime": v.bundle, "input_layout": d.get("input_layout") or v.layout, "batch": v.batch,
            "output": (d.get("graph") or {}).get("output"),
            "status": e.status, "status_reason": e.status_reason,
            "quantized_engine": e.engine if e.precision == "int8" else None,
            "recommended_runtime_engine": d.get("recommended_runtime_engine"),
            "bytecode_version": d.get("bytecode_version"), "conversion": d.get("conversion"),
            "optimize_for_mobile": d.get("optimize_for_mobile"), "operators": d.get("operators"),
            "mobile_usability": d.get("mobile_usability"),
            "sha256": sha256_file(stage / v.file), "size_bytes": size_bytes(stage / v.file),
            "verification": e.verification}


def _input_block(spec: PreprocessSpec, layout: str) -> dict[str, Any]:
    n, c, h, w = spec.input_shape
    return {"shape": [n, h, w, c] if layout == "NHWC" else [n, c, h, w], "layout": layout, "dtype": "float32", "value_range": [0.0, 1.0],
            "colour": "RGB: the grayscale radiograph repeated in all 3 channels",
            "resize": {"method": spec.resize, "size": [spec.input_size, spec.input_size],
                       "order": "decode (a JPEG turned upright as its EXIF orientation says) -> grayscale -> resize -> "
                                "repeat to 3 channels -> divide by 255"},
            "normalization_inside_model": True, "contrast_stretch_inside_model": spec.contrast_stretch,
            "mean_std_inside_model": {"mean": list(spec.mean), "std": list(spec.std)},
            "app_must_pass_mean": [0.0, 0.0, 0.0], "app_must_pass_std": [1.0, 1.0, 1.0]}


def build_manifest(stage: Path, source: dict[str, Any], models: list[ArtifactEntry], vectors: dict[str, Any],
                   evaluation: dict[str, Any] | None, model_name: str | None, model_version: str | None) -> dict:
    spec = PreprocessSpec.from_dict(source["spec"])
    primary = models[0]
    int8 = next((e for e in models if e.runtime == primary.runtime and e.precision == "int8"), None)
    files = [{"path": str(p.relative_to(stage)), "sha256": sha256_file(p), "size_bytes": size_bytes(p)}
             for p in sorted(stage.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    sha, arch = source.get("checkpoint_sha256"), source.get("arch", "resnet18")
    return {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "notice": NOTICE,
        "model": {"name": model_name or f"cxr-{arch}-{spec.num_classes}class",
                  "version": model_version or (sha or "unknown")[:12], "architecture": arch,
                  "source_checkpoint_sha256": sha,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        "classes": list(spec.class_names),
        "labels_file": "labels.txt",
        "input": _input_block(spec, primary.details.get("input_layout") or variant(primary.name).layout),
        "outputs": {"name": "logits", "shape": [1, spec.num_classes], "dtype": "float32",
                    "order": "same as classes / labels.txt", "postprocess": "apply softmax for probabilities"},
        "runtime": {"app_runtimes": sorted({variant(e.name).bundle for e in models}),
                    "torch_version": primary.tool_versions.get("torch"),
                    "bytecode_version": primary.details.get("bytecode_version"),
                    "optimize_for_mobile": primary.details.get("optimize_for_mobile"),
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
    for name in generated_names():
        if name == "manifest.json":
            continue
        if name in staged:
            _replace(stage / name, bundle_dir / name)
        elif name != "README.md" and (bundle_dir / name).exists():
            stale = bundle_dir / name
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    os.replace(stage / "manifest.json", marker)


def runtime_sizes(models: Sequence[ArtifactEntry], artifacts_dir: Path) -> dict[str, int]:
    """Bytes of model files per Flutter runtime package, in bundle order."""
    sizes: dict[str, int] = {}
    for e in models:
        runtime = variant(e.name).bundle
        sizes[runtime] = sizes.get(runtime, 0) + size_bytes(artifacts_dir / e.path)
    return sizes


def size_advice(sizes: dict[str, int]) -> str | None:
    """An app loads one runtime's files: a bundle of several ships the others as dead weight, and with every
    runtime the models alone come near what Google Play accepts in an app."""
    if len(sizes) < 2:
        return None
    total = sum(sizes.values())
    each = ", ".join(f"{r} {b / 1e6:.0f} MB" for r, b in sizes.items())
    advice = (f"this bundle holds the model files of {len(sizes)} Flutter runtimes ({total / 1e6:.0f} MB); an app "
              f"loads one ({each}): bundle only yours with --runtime NAME")
    downloaded = total * DEFLATED_MODEL_RATIO
    if downloaded > 0.75 * PLAY_BASE_MODULE_BYTES:
        share = ", more than" if downloaded > PLAY_BASE_MODULE_BYTES else " of"
        advice += (f". Compressed for download they still come to about {downloaded / 1e6:.0f} MB{share} the "
                   f"{PLAY_BASE_MODULE_BYTES / 1e6:.0f} MB Google Play accepts in an app's base module, before the "
                   f"app and the Flutter engine")
    return advice


def _samples(records: Sequence[dict[str, Any]], artifacts_dir: Path, recorded_data: str | None,
             data: Path | None) -> list[Sample] | None:
    """The images the artifacts were verified on; where they are gone, the same files under `data` (the data
    moved, or the export was copied to another machine); None where `data` is given and lacks them too."""
    samples = [Sample(Path(r["path"]), int(r["label"])) for r in records]
    missing = [str(s.path) for s in samples if not s.path.is_file()]
    if not missing:
        return samples
    if data is None:
        raise BundleError(f"{artifacts_dir}/artifacts.json: {len(missing)} verification images are gone (e.g. "
                          f"{missing[0]}); pass --data with the images, or export again")
    old_root, new_root = _folder_of(Path(recorded_data or "")), _folder_of(data)
    moved = [Sample(new_root / s.path.relative_to(old_root), s.label) if s.path.is_relative_to(old_root) else s
             for s in samples]
    if all(s.path.is_file() for s in moved):
        log.info("the verification images are gone from %s; using the same files under %s", old_root, new_root)
        return moved
    log.warning("%d verification images are gone (e.g. %s) and not under --data %s: the test vectors are val "
                "images of --data instead", len(missing), missing[0], data)
    return None


def _folder_of(data: Path) -> Path:
    """The folder image paths are under: --data itself, or a labels CSV's folder."""
    return data.parent if data.suffix.lower() == ".csv" else data


def bundle_images(artifacts_dir: Path, source: dict[str, Any], data: Path | None,
                  metrics_size: int | None) -> tuple[list[Sample], list[Sample] | None, dict[str, Any] | None]:
    """(test-vector images, images the bundled models are scored on, where those came from): the images the
    artifacts were verified on, and the val split of the data they recorded (or of `data`)."""
    from train.data import DataError, labelled_splits, seeded_subset

    spec = PreprocessSpec.from_dict(source["spec"])
    vectors = _samples(source.get("eval_images") or [], artifacts_dir, source.get("data"), data)
    data = data or (Path(source["data"]) if source.get("data") and Path(source["data"]).exists() else None)
    if data is None:
        return vectors, vectors or None, {"data": "the verification images in artifacts.json", "split": "val"}
    data = _split_as_trained(source, data)
    idx = labelled_splits(data, spec.class_names)
    val = idx.split("val") or idx.split("test")
    if not val:
        raise DataError(f"--data {data}: no val or test images to score the bundled models on")
    metrics = val if metrics_size is None else seeded_subset(val, metrics_size, seed=1)
    return vectors or seeded_subset(val, 32, seed=1), metrics, {"data": str(data), "split": "val"}


def _split_as_trained(source: dict[str, Any], data: Path) -> Path:
    """`data` split as training split it, where it is the data the exported checkpoint was trained on (its run's
    splits.csv: train.checkpoint.training_split) and that checkpoint is still where it was exported from."""
    from train.checkpoint import training_split

    ckpt = _source_checkpoint(source)
    return data if ckpt is None else training_split(ckpt, data)


def _source_checkpoint(source: dict[str, Any]) -> Any:
    """The checkpoint the artifacts were exported from, when it is still where it was and unchanged; else None."""
    from train.checkpoint import load_checkpoint

    path = Path(source.get("checkpoint") or "")
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    return ckpt if ckpt.sha256 == source.get("checkpoint_sha256") else None


def _reference_model(source: dict[str, Any]) -> Any:
    """The float PyTorch model, when its checkpoint is still where it was exported from (for the reference logits)."""
    ckpt = _source_checkpoint(source)
    return None if ckpt is None else ckpt.build_deploy_model()


def write_bundle(artifacts_dir: str | Path, bundle_dir: str | Path, *, data: Path | None = None,
                 force: bool = False, include: Sequence[str] | None = None, test_vectors: int = 3,
                 model_name: str | None = None, model_version: str | None = None, metrics_size: int | None = None,
                 allow_unverified: bool = False, runtime: str | None = None) -> Path:
    """Write the Flutter bundle from `artifacts_dir`/artifacts.json alone: its source block names the checkpoint,
    the spec and the images the files were verified on; `data` (labelled images) overrides the recorded data.
    `runtime` (a Flutter runtime package, e.g. tflite_flutter) bundles only the files that package loads."""
    from train.atomic import write_json, write_text

    artifacts_dir, bundle_dir = Path(artifacts_dir), Path(bundle_dir)
    check_target(bundle_dir, force, artifacts_dir)
    source = read_source(artifacts_dir)
    models = pick_models(artifacts_dir, source.get("checkpoint_sha256"), include, allow_unverified, runtime)
    sizes = runtime_sizes(models, artifacts_dir)
    require_free_space(bundle_dir, sum(sizes.values()) + (8 << 20), f"the bundle {bundle_dir}")  # + vectors, manifest
    spec = PreprocessSpec.from_dict(source["spec"])
    vector_images, metric_images, eval_info = bundle_images(artifacts_dir, source, data, metrics_size)
    stage = _stage(bundle_dir)
    try:
        for e in models:
            shutil.copyfile(artifacts_dir / e.path, stage / variant(e.name).file)
        write_text(stage / "labels.txt", "".join(f"{c}\n" for c in spec.class_names))
        vectors = write_test_vectors(stage, spec, models, vector_images, test_vectors, _reference_model(source))
        evaluation = evaluate_models(stage, spec, models, metric_images) if metric_images else None
        if evaluation is not None:
            evaluation.update(eval_info or {})
        shutil.copyfile(APP_README_PATH, stage / "README.md")
        manifest = build_manifest(stage, source, models, vectors, evaluation, model_name, model_version)
        validate_manifest(manifest)
        write_json(stage / "manifest.json", manifest)
        commit(stage, bundle_dir)
    except OSError as err:
        raise BundleError(f"writing the bundle to {bundle_dir} failed: {err}") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote the Flutter bundle to %s (%d models)", bundle_dir, len(models))
    advice = size_advice(sizes)
    if advice:
        log.warning("%s", advice)
    return bundle_dir
