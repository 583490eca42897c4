"""`python -m export.lite`: TorchScript Lite models (.ptl) for the PyTorch Mobile runtime, proven in the lite
interpreter, plus the full TorchScript file servers use, and then the Flutter asset bundle.

Every .ptl is written under a temporary name, loaded back with the lite interpreter apps embed, compared with
the float PyTorch model, and only then renamed into place. The float .ptl must match within FLOAT_ATOL on the
logits; the int8 .ptl reports top-1 agreement and the largest probability change.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from export.manifest import ArtifactEntry, record
from export.runners import EagerRunner, get_runner
from train.atomic import atomic_path, sha256_file, size_bytes
from train.checkpoint import Checkpoint
from train.data import Sample, load_batch

log = logging.getLogger(__name__)

FLOAT_ATOL = 1e-4
FILES = {"ptl_fp32": "model.ptl", "ptl_int8": "model_int8.ptl", "torchscript_fp32": "model.torchscript.pt"}
INT8_MODES = ("static", "dynamic", "none")
GENERATED_INPUTS = 8


class LiteExportError(RuntimeError):
    """An export that cannot be done as asked, or an artifact that failed its proof."""


def script_or_trace(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """torch.jit.script keeps control flow (e.g. the optional contrast stretch); tracing is the fallback for
    models scripting cannot compile. Returns the module and which method was used."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(model), "script"
        except Exception as err:  # scripting fails on many Python constructs; tracing still works for them
            log.warning("torch.jit.script failed (%s: %s); falling back to torch.jit.trace",
                        type(err).__name__, str(err).splitlines()[0][:200])
        with torch.inference_mode():
            return torch.jit.trace(model, example, check_trace=False), "trace"


def try_optimize_for_mobile(module: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule | None, dict]:
    """optimize_for_mobile needs XNNPACK; builds without it raise. Record why instead of crashing."""
    from torch.utils.mobile_optimizer import optimize_for_mobile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize_for_mobile(module), {"status": "applied", "reason": None}
    except Exception as err:
        reason = " ".join(str(err).split())
        if "XNNPACK is not enabled" in reason:
            reason = "this torch build has no XNNPACK (" + reason[reason.find("XNNPACK is not enabled"):][:120] + ")"
        log.info("optimize_for_mobile not applied: %s", reason[:200])
        return None, {"status": "not applied", "reason": reason[:500]}


@functools.lru_cache(maxsize=1)
def bytecode_versions() -> tuple[int, ...]:
    """Lite-interpreter bytecode versions this torch can write: its own, plus what it can backport to
    (found by trying on a tiny module, since torch does not publish the range)."""
    import tempfile

    from torch.jit.mobile import _backport_for_mobile, _get_model_bytecode_version

    with tempfile.TemporaryDirectory(prefix="cxr-bytecode-") as tmp:
        src = Path(tmp) / "probe.ptl"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(nn.Linear(2, 2))._save_for_lite_interpreter(str(src))
        current = _get_model_bytecode_version(str(src))
        ok = [current]
        for v in range(current - 1, 0, -1):
            try:
                if not _backport_for_mobile(str(src), str(Path(tmp) / f"v{v}.ptl"), v):
                    break
            except Exception:  # older targets fail inside the backport chain
                break
            ok.append(v)
    return tuple(sorted(ok))


def check_bytecode_version(version: int | None) -> None:
    if version is None:
        return
    ok = bytecode_versions()
    if version not in ok:
        raise LiteExportError(f"--bytecode-version {version}: this torch {torch.__version__} writes bytecode "
                              f"v{max(ok)} and can backport to {list(ok)}; pick one of those (7 suits "
                              f"runtimes that say 'model version must be between 3 and 7')")


def save_ptl(module: torch.jit.ScriptModule, dest: Path, bytecode_version: int | None) -> dict[str, Any]:
    """_save_for_lite_interpreter, then backport if asked; returns bytecode version and operator list."""
    from torch.jit.mobile import (_backport_for_mobile, _export_operator_list, _get_model_bytecode_version,
                                  _load_for_lite_interpreter)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module._save_for_lite_interpreter(str(dest))
        written = _get_model_bytecode_version(str(dest))
        if bytecode_version is not None and bytecode_version != written:
            newer = dest.with_name(dest.name + ".v" + str(written))
            dest.rename(newer)
            try:
                if not _backport_for_mobile(str(newer), str(dest), bytecode_version):
                    raise LiteExportError(f"backport to bytecode v{bytecode_version} failed; "
                                          f"choose one of {list(bytecode_versions())}")
            finally:
                newer.unlink(missing_ok=True)
        ops = sorted(_export_operator_list(_load_for_lite_interpreter(str(dest))))
    return {"bytecode_version": _get_model_bytecode_version(str(dest)), "bytecode_version_written": written,
            "operators": ops}


def sample_inputs(spec, samples: Sequence[Sample] | None, n: int = GENERATED_INPUTS,
                  seed: int = 0) -> tuple[np.ndarray, str]:
    """Real images when given (the proof that matters), else seeded uniform noise in [0, 1]."""
    if samples:
        return load_batch(list(samples), spec), f"{len(samples)} real images"
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, spec.input_size, spec.input_size), dtype=np.float32)
    return x, f"{n} GENERATED random inputs in [0, 1] (no --data given)"


def _reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    return EagerRunner().use_module(module).run(x)


def _check_shape(out: np.ndarray, n: int, classes: int, what: str) -> None:
    if out.shape != (n, classes) or not np.isfinite(out).all():
        raise LiteExportError(f"{what}: output shape {out.shape} (expected {(n, classes)}) or non-finite values")


def _entry(ckpt: Checkpoint, name: str, fmt: str, precision: str, runtime: str, **kw: Any) -> ArtifactEntry:
    return ArtifactEntry(name=name, format=fmt, precision=precision, runtime=runtime,
                         source_checkpoint_sha256=ckpt.sha256, tool_versions={"torch": str(torch.__version__)},
                         **kw)


def _write_proven(out_dir: Path, name: str, write: Callable[[Path], dict], prove: Callable[[Path], dict],
                  ckpt: Checkpoint, fmt: str, precision: str, runtime: str, engine: str | None,
                  details: dict) -> ArtifactEntry:
    """Write to a temporary name, prove it, rename; on any failure leave no file and record 'failed'."""
    dest = out_dir / FILES[name]
    try:
        with atomic_path(dest) as tmp:
            info = write(tmp)
            verification = prove(tmp)
        entry = _entry(ckpt, name, fmt, precision, runtime, path=FILES[name], status="verified",
                       sha256=sha256_file(dest), size_bytes=size_bytes(dest), engine=engine,
                       verification=verification, details={**details, **info})
    except Exception as err:
        dest.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
        log.error("%s failed: %s", name, err)
        entry = _entry(ckpt, name, fmt, precision, runtime, path=None, status="failed", engine=engine,
                       details=details, error=f"{type(err).__name__}: {err}")
    record(out_dir, entry)
    return entry


def _float_proof(ref: np.ndarray, x: np.ndarray, runtime: str, inputs: str, classes: int) -> Callable:
    def prove(path: Path) -> dict:
        from export.runners import compare_logits

        out = get_runner(runtime).load(path).run(x)
        _check_shape(out, len(x), classes, path.name)
        cmp = compare_logits(ref, out)
        if not cmp["max_abs_logit_diff"] <= FLOAT_ATOL:
            raise LiteExportError(f"{runtime} logits differ from the PyTorch model by "
                                  f"{cmp['max_abs_logit_diff']:.3g} > {FLOAT_ATOL} on {inputs}")
        return {"method": f"{runtime} vs eager float model", "inputs": inputs, "tolerance": FLOAT_ATOL,
                "passed": True, **cmp}
    return prove


def export_torchscript(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                       calib_samples: list[Sample] | None = None, **_: Any) -> list[ArtifactEntry]:
    """Full TorchScript (torch.jit.save) for TorchServe and the benchmarks; not loadable by the lite interpreter."""
    out_dir = Path(out_dir)
    model = ckpt.build_deploy_model()
    x, inputs = sample_inputs(ckpt.spec, eval_samples)
    ref = _reference(model, x)

    def write(tmp: Path) -> dict:
        module, method = script_or_trace(model, torch.from_numpy(x[:1]))
        torch.jit.save(module, str(tmp))
        return {"conversion": method}

    details = {"input_shape": list(ckpt.spec.input_shape), "input_range": [0.0, 1.0],
               "normalization_in_graph": True, "spec": ckpt.spec.to_dict()}
    return [_write_proven(out_dir, "torchscript_fp32", write,
                          _float_proof(ref, x, "torchscript", inputs, ckpt.spec.num_classes), ckpt,
                          "torchscript", "fp32", "torchscript", None, details)]


def _choose_module(model: nn.Module, x: np.ndarray, ref: np.ndarray, tol: float | None) -> tuple[Any, dict]:
    """Script (or trace), then optimize_for_mobile where it works and keeps the logits (within `tol`)."""
    scripted, method = script_or_trace(model, torch.from_numpy(x[:1]))
    optimized, ofm = try_optimize_for_mobile(scripted)
    if optimized is not None and tol is not None:
        diff = float(np.abs(_reference(optimized, x) - ref).max())
        if not diff <= tol:
            optimized, ofm = None, {"status": "not applied",
                                    "reason": f"optimized model changed logits by {diff:.3g} > {tol}"}
    return (optimized if optimized is not None else scripted), {"conversion": method, "optimize_for_mobile": ofm}


def _int8_proof(float_ref: np.ndarray, int8_ref: np.ndarray, x: np.ndarray, engine: str, inputs: str,
                classes: int) -> Callable:
    def prove(path: Path) -> dict:
        from export.runners import compare_logits

        out = get_runner("pytorch-lite", engine=engine).load(path).run(x)
        _check_shape(out, len(x), classes, path.name)
        vs_eager = compare_logits(int8_ref, out)
        return {"method": "pytorch-lite int8 vs eager float model", "inputs": inputs, "engine": engine,
                **compare_logits(float_ref, out),
                "max_abs_logit_diff_vs_eager_int8": vs_eager["max_abs_logit_diff"]}
    return prove


def _calibration(ckpt: Checkpoint, calib_samples: list[Sample] | None, tmp: Path) -> tuple[list[Sample], str]:
    """Train-split images when given; else SYNTHETIC images, so the command still runs (and says so)."""
    if calib_samples:
        return list(calib_samples), f"{len(calib_samples)} images from the train split"
    from train.data import discover
    from train.synthetic import make_synthetic_dataset

    log.warning("no calibration images given: calibrating int8 on SYNTHETIC images; pass --data for a real model")
    root = make_synthetic_dataset(tmp / "calib", per_class=8, size=ckpt.spec.input_size, seed=1,
                                  classes=ckpt.spec.class_names)
    samples = discover(root, ckpt.spec.class_names).samples
    return samples, f"{len(samples)} SYNTHETIC generated images (no --data given; not representative)"


def export_lite(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                calib_samples: list[Sample] | None = None, int8: str = "static", engine: str = "qnnpack",
                bytecode_version: int | None = None, **_: Any) -> list[ArtifactEntry]:
    """Write and prove model.ptl (ptl_fp32) and, unless int8='none', model_int8.ptl (ptl_int8)."""
    import tempfile

    from quantize.torch_ao import qconfig_description, set_engine
    from quantize.variants import make_int8_model

    if int8 not in INT8_MODES:
        raise LiteExportError(f"--int8 must be one of {INT8_MODES}, got {int8!r}")
    check_bytecode_version(bytecode_version)
    out_dir = Path(out_dir)
    spec, classes = ckpt.spec, ckpt.spec.num_classes
    model = ckpt.build_deploy_model()
    x, inputs = sample_inputs(spec, eval_samples)
    ref = _reference(model, x)
    base = {"input_shape": list(spec.input_shape), "input_range": [0.0, 1.0], "normalization_in_graph": True,
            "spec": spec.to_dict(), "requested_bytecode_version": bytecode_version}
    module, info = _choose_module(model, x, ref, FLOAT_ATOL)
    entries = [_write_proven(out_dir, "ptl_fp32", lambda t: {**info, **save_ptl(module, t, bytecode_version)},
                             _float_proof(ref, x, "pytorch-lite", inputs, classes), ckpt, "torchscript-lite",
                             "fp32", "pytorch-lite", None, base)]
    if int8 == "none":
        return entries
    previous = torch.backends.quantized.engine
    try:
        set_engine(engine)
        with tempfile.TemporaryDirectory(prefix="cxr-calib-") as tmp:
            calib, calib_note = _calibration(ckpt, calib_samples, Path(tmp)) if int8 == "static" else ([], "none")
            qmodel = make_int8_model(ckpt, int8, engine, calib_samples=calib or None, progress=False)
        qref = _reference(qmodel, x)
        qmodule, qinfo = _choose_module(qmodel, x, qref, None)
        details = {**base, "int8_mode": int8, "calibration": calib_note, "quantized_engine": engine,
                   "observers": qconfig_description(engine) if int8 == "static" else None,
                   "recommended_runtime_engine": engine,
                   "engine_note": f"quantized for '{engine}'; set torch.backends.quantized.engine='{engine}' "
                                  f"(phones: qnnpack). On x86 desktops the 'x86' engine runs it much faster "
                                  f"but is not what a phone runs."}
        entries.append(_write_proven(out_dir, "ptl_int8", lambda t: {**qinfo, **save_ptl(qmodule, t, bytecode_version)},
                                     _int8_proof(ref, qref, x, engine, inputs, classes), ckpt, "torchscript-lite",
                                     "int8", "pytorch-lite", engine, details))
    finally:
        torch.backends.quantized.engine = previous
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m export.lite`; the argument handling lives in export.lite_cli."""
    from export.lite_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
