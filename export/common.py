"""The export pipeline every format shares: inputs and their origin, the float reference, the proofs, the
statuses and the manifest entries.

Each format module stays a short pipeline (build -> write under a temporary name -> prove in its runner ->
rename -> record); everything around it lives here, names, files, precisions and runtimes come from the
registry (export.registry), and 'verified' is decided in one place (status_for).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export.manifest import ArtifactEntry, record
from export.registry import BASE_TOOLS, format_of, tools, variant
from quantize.targets import MIN_TOP1_AGREEMENT
from train.atomic import atomic_path, require_free_space, sha256_file, size_bytes
from train.checkpoint import Checkpoint
from train.data import Sample, file_digest, images_origin, load_batch
from train.errors import ToolkitError
from train.metrics import compare_logits

log = logging.getLogger(__name__)

FLOAT_ATOL = 1e-4           # float artifacts must reproduce the PyTorch logits this closely
GENERATED_EVAL = 8          # random inputs used when no --data is given


class ExportError(ToolkitError, RuntimeError):
    """An export that cannot be done as asked, or an artifact that failed its proof."""


def tool_versions(names: Sequence[str] | None = None) -> dict[str, str]:
    """Installed versions from package metadata (every registered format's libraries by default): no heavy
    import just to learn a version."""
    out = {}
    for name in tools() if names is None else names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class InputSet:
    """What an artifact was checked on: the images, a description, and where they came from.

    origin: 'real' (images from --data that the toolkit did not make), 'synthetic' (a dataset that
    train.synthetic generated) or 'generated' (seeded noise, when no --data was given). Only 'real'
    makes an artifact 'verified' (see status_for)."""

    x: np.ndarray
    description: str
    origin: str


# Every format of one `python -m export` checks on the same images against the same float logits: decode the
# images and run the float model once per process, not once per format (copies are handed out).
_CACHE: dict[tuple, np.ndarray] = {}
_CACHE_ENTRIES = 6


def _cached(key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_ENTRIES:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = compute()
    return _CACHE[key].copy()


def load_images(ckpt: Checkpoint, samples: Sequence[Sample]) -> np.ndarray:
    """load_batch, once per process for the same images and preprocessing."""
    key = ("images", json.dumps(ckpt.spec.to_dict(), sort_keys=True), tuple(str(s.path) for s in samples))
    return _cached(key, lambda: load_batch(list(samples), ckpt.spec))


def eval_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None, n: int = GENERATED_EVAL,
                seed: int = 0) -> InputSet:
    """Real images when given (the proof that matters), else seeded grayscale noise in [0, 1]
    (three equal channels, like every real input after `load_unit_image`): a numerics check only."""
    if samples:
        origin = images_origin(samples)
        label = "real images (val split)" if origin == "real" else "SYNTHETIC images (val split)"
        return InputSet(load_images(ckpt, samples), f"{len(samples)} {label}", origin)
    size = ckpt.spec.input_size
    gray = np.random.default_rng(seed).integers(0, 256, (n, 1, size, size)).astype(np.float32) / 255.0
    return InputSet(np.repeat(gray, 3, axis=1), f"{n} GENERATED random inputs in [0, 1] (no --data given; "
                    f"a numerics check, not a verification)", "generated")


def check_variants(variants: Sequence[str], choices: Sequence[str]) -> None:
    """A format's `variants` argument, checked before anything is written (the CLI parses --variants with
    export.cli.variants_option; this guards the Python API the same way)."""
    unknown = sorted(set(variants) - set(choices))
    if unknown:
        raise ExportError(f"--variants {unknown}: choose from {list(choices)}")


def require_calibration(calib_samples: Sequence[Sample] | None, what: str, alternatives: str) -> None:
    """Static int8 is calibrated on images from a train split, never on generated inputs: int8
    calibrated on noise lost 6 accuracy points on real X-rays while agreeing 100% on the noise."""
    if not calib_samples:
        raise ExportError(f"{what} needs real calibration images: pass --data with a train split (or train "
                          f"with `python -m train --data ...`, whose checkpoint records its data), or {alternatives}")


def calib_inputs_note(samples: Sequence[Sample] | None) -> str:
    """How the calibration set is described in manifests and reports, with a short digest of its files' bytes:
    two int8 files calibrated alike say so, and a file is reused only for the same images (export.ort_mobile)."""
    require_calibration(samples, "static int8", "export without static int8")
    origin = images_origin(samples)
    digest = hashlib.sha256("".join(f"{file_digest(s.path)}{s.label}\n" for s in samples).encode()).hexdigest()
    return (f"{len(samples)} {'images' if origin == 'real' else 'SYNTHETIC images'} from the train split "
            f"(set {digest[:12]})")


def calib_inputs(ckpt: Checkpoint, samples: Sequence[Sample] | None) -> tuple[np.ndarray, str]:
    """Train-split images for static int8; raises ExportError without them (see require_calibration)."""
    note = calib_inputs_note(samples)  # raises without samples
    return load_images(ckpt, samples), note


def run_artifact(name: str, path: Path, x: np.ndarray, engine: str | None = None) -> np.ndarray:
    """Logits of a written file, in the runtime the registry names for it."""
    from export.runners import get_runner

    return get_runner(variant(name).runtime, engine=engine or variant(name).engine).load(path).run_in_batches(x)


def reference_logits(ckpt: Checkpoint, x: np.ndarray, module: Any = None) -> np.ndarray:
    """The PyTorch model's logits (the float model unless `module` is given), through the same runner code
    path as the benchmarks."""
    from export.runners import EagerRunner
    from train.model import channels_last

    if module is not None:
        return EagerRunner().use_module(module).run_in_batches(x)

    def float_logits() -> np.ndarray:
        return EagerRunner().use_module(channels_last(ckpt.build_deploy_model())).run_in_batches(x)

    if not ckpt.sha256:  # cached only for a checkpoint read from a file
        return float_logits()
    key = ("reference", ckpt.sha256, x.shape, hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest())
    return _cached(key, float_logits)


def check_logits(out: np.ndarray, n: int, classes: int, what: str) -> None:
    if out.shape != (n, classes) or not np.isfinite(out).all():
        raise ExportError(f"{what}: output shape {out.shape} (expected {(n, classes)}) or non-finite values")


def checked_on(inputs: InputSet, runtime: str, engine: str | None) -> dict[str, Any]:
    """Where a check ran: inputs and their origin, the CPU and its int8 features, the engine or provider."""
    from train.cpu import cpu_description

    return {"inputs": inputs.description, "inputs_origin": inputs.origin, "n_images": int(len(inputs.x)),
            "runtime": runtime, "engine": engine, "machine": cpu_description()}


def float_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: InputSet, tol: float = FLOAT_ATOL,
                note: str | None = None, engine: str | None = None) -> dict[str, Any]:
    """Float artifacts: the logits must match the PyTorch model within `tol`, or the artifact is refused."""
    check_logits(out, len(ref), ref.shape[1], runtime)
    cmp = compare_logits(ref, out)
    if not cmp["max_abs_logit_diff"] <= tol:
        raise ExportError(f"{runtime} logits differ from the PyTorch model by {cmp['max_abs_logit_diff']:.3g} "
                          f"> {tol} on {inputs.description}")
    v = {"method": f"executed in {runtime}, compared with the float PyTorch model",
         **checked_on(inputs, runtime, engine), "tolerance": tol, "passed": True, **cmp}
    return {**v, "tolerance_note": note} if note else v


def int8_proof(out: np.ndarray, ref: np.ndarray, runtime: str, inputs: InputSet,
               engine: str | None = None) -> dict[str, Any]:
    """int8 artifacts are not held to the float tolerance: they must run and give finite logits; the
    agreement with the float model is measured and recorded with the target; the quantization report and
    the benchmark judge it on the whole val split (on the 100 images here one flip is already 1%)."""
    check_logits(out, len(ref), ref.shape[1], runtime)
    cmp = compare_logits(ref, out)
    return {"method": f"executed in {runtime}, compared with the float PyTorch model",
            **checked_on(inputs, runtime, engine), "tolerance": None, "passed": True,
            "criterion": "runs and gives finite logits; top-1 agreement recorded against the target",
            "agreement_target": MIN_TOP1_AGREEMENT, **cmp}


def prove_in_runtime(name: str, ref: np.ndarray, inputs: InputSet, engine: str | None = None,
                     tol: float = FLOAT_ATOL, note: str | None = None) -> Callable[[Path], dict[str, Any]]:
    """The standard proof of entry `name`: run the written file in its registered runtime on `inputs` and
    compare with `ref` (float files within `tol`, int8 files by recorded agreement)."""
    v = variant(name)
    engine = engine or v.engine

    def prove(path: Path) -> dict[str, Any]:
        out = run_artifact(name, path, inputs.x, engine)
        if v.is_int8:
            return int8_proof(out, ref, v.runtime, inputs, engine=engine)
        return float_proof(out, ref, v.runtime, inputs, tol, note, engine=engine)
    return prove


def status_for(verification: dict[str, Any]) -> tuple[str, str | None]:
    """'verified' only for a check on real images; anything else is 'exported', with the reason."""
    origin = verification.get("inputs_origin")
    if verification.get("executed") is False:
        return "exported", (f"not executed in its own runtime here ({verification.get('method')}); it counts as "
                            f"verified only where that runtime runs it")
    if origin == "real":
        return "verified", None
    if origin == "synthetic":
        return "exported", ("checked on SYNTHETIC images that the toolkit generated, not on real X-rays: "
                            "export again with --data pointing at real images to verify it")
    return "exported", ("numerics check on GENERATED inputs only (no --data): it runs and matches the PyTorch "
                        "model there, but it is not verified on real images; export with --data to verify it")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _entry_fields(ckpt: Checkpoint | None, name: str, engine: str | None) -> dict[str, Any]:
    """What the registry says about entry `name`, as ArtifactEntry fields."""
    v, fmt = variant(name), format_of(name)
    return dict(name=name, format=fmt.name, precision=v.precision, runtime=v.runtime, engine=engine or v.engine,
                source_checkpoint_sha256=ckpt.sha256 if ckpt else None,
                tool_versions=tool_versions((*BASE_TOOLS, *fmt.tools)))


def quantize_step(quantize: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run an int8 recipe (calibration included) inside a writer: its result, and the detail write_proven
    records as the entry's quantize step."""
    t0 = time.perf_counter()
    result = quantize()
    return result, {"quantize_s": time.perf_counter() - t0}


def step_times(write_s: float, verify_s: float, quantize_s: float | None = None) -> dict[str, float]:
    """An entry's timing_s: quantize (int8 recipes, calibration included, timed inside `write`), the rest of
    writing (conversion, lowering, saving) and verification, in seconds."""
    steps = {"quantize": round(quantize_s, 2)} if quantize_s is not None else {}
    return {**steps, "convert_and_write": round(write_s - (quantize_s or 0.0), 2), "verify": round(verify_s, 2)}


BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "w8": 1.0, "palette6": 0.75, "palette4": 0.5}


def expected_size(ckpt: Checkpoint, precision: str) -> int:
    """About how many bytes a file of this precision takes: its weights at its width (require_free_space asks a
    tenth more for the graph)."""
    weights = sum(t.numel() for t in ckpt.state_dict.values() if t.is_floating_point())
    return int(weights * BYTES_PER_WEIGHT.get(precision, 4.0))


def write_proven(ckpt: Checkpoint, out_dir: Path, name: str, *, write: Callable[[Path], dict | None],
                 prove: Callable[[Path], dict], engine: str | None = None,
                 details: dict | None = None) -> ArtifactEntry:
    """Write entry `name` to a temporary name, prove it, rename; on any failure leave no file and record
    'failed'. The file name, format, precision and runtime come from the registry. `write` returns details for
    the entry; its 'quantize_s' (the int8 recipe's seconds inside it) becomes the entry's quantize step."""
    file = variant(name).file
    dest = Path(out_dir) / file
    details = dict(details or {})
    try:
        require_free_space(out_dir, expected_size(ckpt, variant(name).precision), dest)
        with atomic_path(dest) as tmp:
            t0 = time.perf_counter()
            written = dict(write(tmp) or {})
            t1 = time.perf_counter()
            verification = prove(tmp)
            quantize_s = written.pop("quantize_s", None)
            details.update(written)
            details["timing_s"] = step_times(t1 - t0, time.perf_counter() - t1, quantize_s)
        status, reason = status_for(verification)
        entry = ArtifactEntry(**_entry_fields(ckpt, name, engine), path=file, status=status, status_reason=reason,
                              sha256=sha256_file(dest), size_bytes=size_bytes(dest), verification=verification,
                              details=details)
    except Exception as err:  # any failure is a 'failed' row, never a crash of the whole export
        remove_path(dest)  # a stale file from an earlier run must not pass for this one
        log.error("%s failed: %s: %s", name, type(err).__name__, err)
        return record_failed(ckpt, out_dir, name, f"{type(err).__name__}: {err}", engine=engine, details=details)
    record(out_dir, entry)
    return entry


def failed_entry(ckpt: Checkpoint | None, name: str, error: str, engine: str | None = None,
                 details: dict | None = None) -> ArtifactEntry:
    return ArtifactEntry(**_entry_fields(ckpt, name, engine), path=None, status="failed",
                         details=dict(details or {}), error=error)


def record_failed(ckpt: Checkpoint | None, out_dir: Path, name: str, error: str, engine: str | None = None,
                  details: dict | None = None) -> ArtifactEntry:
    """Record entry `name` as 'failed' with the reason, removing any file an earlier run left under its name."""
    remove_path(Path(out_dir) / variant(name).file)
    entry = failed_entry(ckpt, name, error, engine, details)
    record(out_dir, entry)
    return entry
