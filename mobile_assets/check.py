"""`python -m mobile_assets --check DIR`: is a bundle whole where it was copied, and do its models still give its
expected logits here?

An app's `assets/` folder is filled by hand, by a build script or by git (whose LFS can leave a pointer where a
model should be), often long after the bundle was written. This re-reads the folder as the app will: the manifest
against its schema, every listed file against its sha256, and then every bundled model, in its own runtime on
this machine, on the bundle's test vectors against the logits the bundle promises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from export.common import FLOAT_ATOL
from export.runners import get_runner
from mobile_assets import validate_manifest
from mobile_assets.bundle import BundleError
from train.atomic import sha256_file
from train.metrics import compare_logits

INT8_ATOL = 1e-3  # an int8 file on the engine it was bundled with; other CPUs' int8 kernels may differ more


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """manifest.json, schema-checked; a folder without one holds no complete bundle (it is written last)."""
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no manifest.json, so no complete bundle (the toolkit writes it last); "
                          f"copy the whole bundle folder, or write it again with python -m mobile_assets")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not JSON ({err}); copy it again from the bundle") from err
    validate_manifest(manifest)
    return manifest


def check_files(bundle_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Every listed file present with its sha256 (a BundleError names the first that is not); returns the files
    in the folder that the manifest does not list (left from another bundle, say)."""
    for f in manifest["files"]:
        path = bundle_dir / f["path"]
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing; copy the whole bundle folder")
        if sha256_file(path) != f["sha256"]:
            size = path.stat().st_size
            if _crlf_converted(path, f["sha256"]):
                raise BundleError(
                    f"{path}: its line endings were turned into CRLF after bundling (git's core.autocrlf on "
                    f"Windows, or an editor), so an app reads every label with a trailing '\\r'. Tell git the "
                    f"bundle's files are not text, {_gitattributes_line(bundle_dir)}, and copy the bundle again")
            raise BundleError(f"{path}: its sha256 differs from manifest.json ({size} bytes, the manifest says "
                              f"{f['size_bytes']}): changed or cut short after bundling (a git LFS pointer is a few "
                              f"hundred bytes); copy it again from the bundle")
    listed = {f["path"] for f in manifest["files"]} | {"manifest.json"}
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                  if p.is_file() and p.relative_to(bundle_dir).as_posix() not in listed)


def _gitattributes_line(bundle_dir: Path) -> str:
    """Where and what to write: .gitattributes patterns are relative to the repository, not to where --check ran."""
    folder = bundle_dir.resolve()
    repo = next((d for d in (folder, *folder.parents) if (d / ".git").exists()), None)
    if repo is None:
        return "a line `assets/cxr/** -text` (the bundle's folder from your app repository's root) in its .gitattributes"
    rel = folder.relative_to(repo).as_posix()
    return f"a line `{rel + '/' if rel != '.' else ''}** -text` in {repo / '.gitattributes'}"


def _crlf_converted(path: Path, sha256: str) -> bool:
    """Whether the file is the bundled one with each LF turned into CRLF (only small text files are tried)."""
    import hashlib

    if path.stat().st_size > 1 << 24:
        return False
    data = path.read_bytes()
    return b"\r\n" in data and hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest() == sha256


def check_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest of a whole bundle: schema-valid, every listed file present with its sha256."""
    manifest = read_manifest(Path(bundle_dir))
    check_files(Path(bundle_dir), manifest)
    return manifest


def _vector_inputs(bundle_dir: Path, manifest: dict[str, Any]) -> list[np.ndarray]:
    """The vectors' NCHW inputs, one (1, 3, H, W) array each: the toolkit's runners take NCHW and lay it out as
    their file wants (NHWC for .tflite), as when the bundle computed its expected logits."""
    return [np.fromfile(bundle_dir / v["input"], dtype="<f4").reshape(v["shape"])
            for v in manifest["test_vectors"]["vectors"]]


def replay_test_vectors(bundle_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bundled model run here, vector by vector (some files take batch 1 only), against its expected
    logits: 'agrees' within the float tolerance (or 1e-3 for int8), 'top class agrees' where only an int8
    file's logits moved further, 'differs' where a top class changed or a float file is off, 'not run here'
    where this machine lacks its runtime."""
    expected = json.loads((bundle_dir / manifest["test_vectors"]["expected_logits"]).read_text(encoding="utf-8"))
    names = [v["name"] for v in manifest["test_vectors"]["vectors"]]
    inputs = _vector_inputs(bundle_dir, manifest)
    rows = []
    for m in manifest["models"]:
        row = {"file": m["file"], "runtime": m["runtime"], "engine": m.get("quantized_engine"),
               "vectors": len(names)}
        want = expected["logits"].get(m["file"])
        if not isinstance(want, dict):
            rows.append({**row, "result": "not checked", "why": f"the bundle holds no expected logits ({want})"})
            continue
        try:
            runner = get_runner(m["runtime"], engine=m.get("quantized_engine")).load(bundle_dir / m["file"])
            got = np.concatenate([runner.run(x) for x in inputs])
        except Exception as err:  # no runtime here (CoreML off macOS), or a file its runtime refuses
            rows.append({**row, "result": "not run here", "why": f"{type(err).__name__}: {str(err).strip()[:200]}"})
            continue
        compared = compare_logits(np.array([want[n] for n in names], dtype=np.float64), got)
        diff, same_top = compared["max_abs_logit_diff"], compared["top1_agreement"] == 1.0
        int8 = m["precision"] == "int8"
        tolerance = INT8_ATOL if int8 else FLOAT_ATOL
        result = ("agrees" if diff <= tolerance and same_top else
                  "top class agrees" if int8 and same_top else "differs")
        rows.append({**row, "result": result, "max_abs_logit_diff": diff, "tolerance": tolerance,
                     "top1_same": same_top})
    return rows


def check(bundle_dir: str | Path) -> dict[str, Any]:
    """The whole check: files, then every model on the test vectors. Raises BundleError where the folder is not
    a whole bundle; the returned 'ok' is False where a model differs from what the bundle promises."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"--check {bundle_dir}: no such folder; pass the folder holding manifest.json")
    manifest = read_manifest(bundle_dir)
    unlisted = check_files(bundle_dir, manifest)
    rows = replay_test_vectors(bundle_dir, manifest)
    return {"bundle": str(bundle_dir), "files": len(manifest["files"]), "unlisted": unlisted, "models": rows,
            "ok": all(r["result"] != "differs" for r in rows)}


def render(result: dict[str, Any]) -> str:
    """What the check found, one line per model, with the CPU (int8 numerics depend on it)."""
    from train.cpu import cpu_description

    cpu = cpu_description()
    lines = [f"{result['bundle']}: manifest.json valid, {result['files']} files present with their sha256"]
    if result["unlisted"]:
        lines.append(f"  not in manifest.json (left from another bundle?): {', '.join(result['unlisted'][:10])}")
    lines.append(f"test vectors replayed on {cpu['cpu_model']} ({cpu['arch']}, int8 ISA {cpu['x86_int8_isa']}):")
    for r in result["models"]:
        where = f"{r['runtime']}" + (f" ({r['engine']})" if r["engine"] else "")
        if "max_abs_logit_diff" in r:
            detail = (f"max|dlogit| {r['max_abs_logit_diff']:.2e} over {r['vectors']} vectors (tolerance "
                      f"{r['tolerance']:g}), top class {'the same' if r['top1_same'] else 'CHANGED'}")
        else:
            detail = r["why"]
        lines.append(f"  {r['file']:<24} {where:<36} {r['result']:<17} {detail}")
    if any(r["result"] == "top class agrees" for r in result["models"]):
        lines.append("  (an int8 file's logits move with the CPU's int8 kernels; its top class must not)")
    return "\n".join(lines)
