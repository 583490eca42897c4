"""TorchScript formats: TorchScript Lite (.ptl) for the PyTorch Mobile lite interpreter, proven in that
interpreter, and the full TorchScript file servers use. `python -m export.lite` runs them and then writes
the Flutter asset bundle.

Every .ptl is written under a temporary name, loaded back with the lite interpreter apps embed, compared with
the float PyTorch model, and only then renamed into place. The float .ptl must match within FLOAT_ATOL on the
logits; the int8 .ptl reports top-1 agreement and the largest probability change.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.common import (FLOAT_ATOL, ExportError, InputSet, calib_inputs_note, eval_inputs, int8_proof,
                           prove_in_runtime, quantize_step,
                           reference_logits, require_calibration, run_artifact, write_proven)
from export.manifest import ArtifactEntry
from export.metadata import METADATA_FILE, embedded_metadata, from_json, to_json
from train.checkpoint import Checkpoint
from train.data import Sample
from train.model import channels_last
from train.metrics import compare_logits

log = logging.getLogger(__name__)

INT8_MODES = ("static", "dynamic", "none")
# Pre-checks that only choose between two graphs (folded or not; the lite interpreter vs eager int8) run on the
# first few eval images; every written file is still proven on all of them in its own runtime.
PRECHECK_IMAGES = 8


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
        raise ExportError(f"--bytecode-version {version}: this torch {torch.__version__} writes bytecode "
                              f"v{max(ok)} and can backport to {list(ok)}; pick one of those (7 suits "
                              f"runtimes that say 'model version must be between 3 and 7')")


def save_ptl(module: torch.jit.ScriptModule, dest: Path, bytecode_version: int | None,
             meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """_save_for_lite_interpreter with the metadata as an extra file, then backport if asked; returns bytecode
    version, operator list and the embedded metadata as read back from the written file."""
    from torch.jit.mobile import (_backport_for_mobile, _export_operator_list, _get_model_bytecode_version,
                                  _load_for_lite_interpreter)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module._save_for_lite_interpreter(str(dest), _extra_files={METADATA_FILE: to_json(meta)} if meta else {})
        written = _get_model_bytecode_version(str(dest))
        if bytecode_version is not None and bytecode_version != written:
            newer = dest.with_name(dest.name + ".v" + str(written))
            dest.rename(newer)
            try:
                if not _backport_for_mobile(str(newer), str(dest), bytecode_version):
                    raise ExportError(f"backport to bytecode v{bytecode_version} failed; "
                                          f"choose one of {list(bytecode_versions())}")
            finally:
                newer.unlink(missing_ok=True)
        ops = sorted(_export_operator_list(_load_for_lite_interpreter(str(dest))))
    embedded = read_metadata(dest)
    if meta and embedded != meta:
        raise ExportError(f"{dest.name}: the embedded metadata did not survive saving (bytecode v{bytecode_version})")
    return {"bytecode_version": _get_model_bytecode_version(str(dest)), "bytecode_version_written": written,
            "operators": ops, "embedded_metadata": embedded}


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata extra file of a TorchScript or .ptl archive (a zip), read without loading the model."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
        return from_json(zf.read(name)) if name else None


def describe(path: Path) -> dict[str, Any]:
    """For a .ptl: its bytecode version and the operators the lite interpreter needs; for full TorchScript: its
    archive's code files."""
    import zipfile

    from torch.jit.mobile import _export_operator_list, _get_model_bytecode_version, _load_for_lite_interpreter

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any(n.endswith("/bytecode.pkl") for n in names):
        return {"kind": "full TorchScript (torch.jit.load)", "code_files": sum(n.endswith(".py") for n in names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = sorted(_export_operator_list(_load_for_lite_interpreter(str(path))))
    return {"kind": "TorchScript Lite (lite interpreter)", "bytecode_version": _get_model_bytecode_version(str(path)),
            "operator_types": len(ops), "quantized_operator_types": sum(o.startswith("quantized::") for o in ops)}


def export_torchscript(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                       calib_samples: list[Sample] | None = None, **_: Any) -> list[ArtifactEntry]:
    """Full TorchScript (torch.jit.save) for TorchServe and the benchmarks; not loadable by the lite interpreter."""
    out_dir = Path(out_dir)
    model = channels_last(ckpt.build_deploy_model())  # kept by freezing: see train.model.channels_last
    inputs = eval_inputs(ckpt, eval_samples)
    ref = reference_logits(ckpt, inputs.x)

    def write(tmp: Path) -> dict:
        module, method = script_or_trace(model, torch.from_numpy(inputs.x[:1]))
        module, folded = fold_and_freeze(module, inputs.x, ref, FLOAT_ATOL)
        meta = embedded_metadata(ckpt, "torchscript_fp32")
        with warnings.catch_warnings():  # "torch.jit.save is deprecated": the README says so once
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: to_json(meta)})
        return {"conversion": method, "fold_and_freeze": folded, "embedded_metadata": read_metadata(tmp)}

    details = {"input_shape": list(ckpt.spec.input_shape), "input_range": [0.0, 1.0],
               "normalization_in_graph": True, "spec": ckpt.spec.to_dict()}
    return [write_proven(ckpt, out_dir, "torchscript_fp32", details=details, write=write,
                         prove=prove_in_runtime("torchscript_fp32", ref, inputs))]


def fold_and_freeze(module: torch.jit.ScriptModule, x: np.ndarray, ref: np.ndarray,
                    tol: float) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The part of mobile optimization that needs no XNNPACK: torch.jit.freeze inlines the weights and folds
    every BatchNorm into its convolution (no aten::batch_norm left), kept only if the logits of the first
    PRECHECK_IMAGES stay within `tol` (the written file is then proven on every eval image)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(module.eval())
    x, ref = x[:PRECHECK_IMAGES], ref[:PRECHECK_IMAGES]
    diff = float(np.abs(reference_logits(None, x, frozen) - ref).max())
    left = sum(n.kind() == "aten::batch_norm" for n in frozen.graph.nodes())
    if not diff <= tol:
        return module, {"status": "not applied", "reason": f"freezing changed logits by {diff:.3g} > {tol}"}
    return frozen, {"status": "applied", "batch_norm_left": left, "max_abs_logit_change": diff}


def _choose_module(model: nn.Module, x: np.ndarray, ref: np.ndarray, tol: float | None) -> tuple[Any, dict]:
    """Script (or trace); for float models freeze and fold BatchNorm (fold_and_freeze); then optimize_for_mobile
    where it works and keeps the logits (within `tol`)."""
    scripted, method = script_or_trace(model, torch.from_numpy(x[:1]))
    folded = None
    if tol is not None:
        scripted, folded = fold_and_freeze(scripted, x, ref, tol)
    optimized, ofm = try_optimize_for_mobile(scripted)
    if optimized is not None and tol is not None:
        diff = float(np.abs(reference_logits(None, x[:PRECHECK_IMAGES], optimized) - ref[:PRECHECK_IMAGES]).max())
        if not diff <= tol:
            optimized, ofm = None, {"status": "not applied",
                                    "reason": f"optimized model changed logits by {diff:.3g} > {tol}"}
    return (optimized if optimized is not None else scripted), {"conversion": method, "optimize_for_mobile": ofm,
                                                                "fold_and_freeze": folded}


def _int8_proof(float_ref: np.ndarray, int8_ref: np.ndarray, inputs: InputSet, engine: str):
    """The int8 proof in the lite interpreter, plus how far the interpreter is from eager int8 (on the
    images `int8_ref` holds: eager int8 with qnnpack on x86 is slow, and this only checks the interpreter)."""
    def prove(path: Path) -> dict:
        out = run_artifact("ptl_int8", path, inputs.x, engine)
        return {**int8_proof(out, float_ref, "pytorch-lite", inputs, engine=engine),
                "max_abs_logit_diff_vs_eager_int8": compare_logits(int8_ref, out[:len(int8_ref)])["max_abs_logit_diff"],
                "eager_int8_compared_on_images": len(int8_ref)}
    return prove


def _int8_writer(ckpt: Checkpoint, int8: str, engine: str, calib_samples: list[Sample] | None, x86_isa: str,
                 x: np.ndarray, eager: dict[str, np.ndarray], bytecode_version: int | None):
    """Quantize (calibration included, timed as the entry's 'quantize' step), script and save model_int8.ptl;
    the eager int8 logits on the first images go to `eager['qref']` for the proof."""
    from quantize.variants import make_int8_model

    def write(tmp: Path) -> dict[str, Any]:
        qmodel, step = quantize_step(lambda: make_int8_model(
            ckpt, int8, engine, calib_samples=calib_samples if int8 == "static" else None, progress=False,
            reduce_range=x86_isa))
        eager["qref"] = reference_logits(ckpt, x[:PRECHECK_IMAGES], qmodel)
        qmodule, qinfo = _choose_module(qmodel, x, eager["qref"], None)
        return {**qinfo, **save_ptl(qmodule, tmp, bytecode_version, embedded_metadata(ckpt, "ptl_int8")), **step}
    return write


def export_lite(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                calib_samples: list[Sample] | None = None, int8: str = "static", engine: str = "qnnpack",
                bytecode_version: int | None = None, x86_isa: str = "auto", **_: Any) -> list[ArtifactEntry]:
    """Write and prove model.ptl (ptl_fp32) and, unless int8='none', model_int8.ptl (ptl_int8).
    Static int8 needs `calib_samples` (real train-split images)."""
    from quantize.torch_ao import qconfig_description, quantized_engine

    if int8 not in INT8_MODES:
        raise ExportError(f"--int8 must be one of {INT8_MODES}, got {int8!r}")
    if int8 == "static":
        require_calibration(calib_samples, "static int8 (model_int8.ptl)", "pass --int8 dynamic or --int8 none")
    check_bytecode_version(bytecode_version)
    out_dir = Path(out_dir)
    spec = ckpt.spec
    model = channels_last(ckpt.build_deploy_model())  # kept by freezing: see train.model.channels_last
    inputs = eval_inputs(ckpt, eval_samples)
    x = inputs.x
    ref = reference_logits(ckpt, x)
    base = {"input_shape": list(spec.input_shape), "input_range": [0.0, 1.0], "normalization_in_graph": True,
            "spec": spec.to_dict(), "requested_bytecode_version": bytecode_version}
    module, info = _choose_module(model, x, ref, FLOAT_ATOL)
    entries = [write_proven(ckpt, out_dir, "ptl_fp32", details=base,
                            write=lambda t: {**info, **save_ptl(module, t, bytecode_version,
                                                                embedded_metadata(ckpt, "ptl_fp32"))},
                            prove=prove_in_runtime("ptl_fp32", ref, inputs))]
    if int8 == "none":
        return entries
    with quantized_engine(engine):
        calib_note = calib_inputs_note(calib_samples) if int8 == "static" else "none (dynamic int8)"
        eager: dict[str, np.ndarray] = {}  # the eager int8 logits, for the proof
        details = {**base, "int8_mode": int8, "calibration": calib_note, "quantized_engine": engine,
                   "observers": qconfig_description(engine, x86_isa) if int8 == "static" else None,
                   "recommended_runtime_engine": engine,
                   "engine_note": f"quantized for '{engine}'; set torch.backends.quantized.engine='{engine}' "
                                  f"(phones: qnnpack). On x86 desktops the 'x86' engine runs it much faster "
                                  f"but is not what a phone runs."}
        entries.append(write_proven(ckpt, out_dir, "ptl_int8", engine=engine, details=details,
                                    write=_int8_writer(ckpt, int8, engine, calib_samples, x86_isa, x, eager,
                                                       bytecode_version),
                                    prove=lambda path: _int8_proof(ref, eager["qref"], inputs, engine)(path)))
    return entries
