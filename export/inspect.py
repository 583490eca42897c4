"""`python -m export.inspect FILE [FILE ...] [--json]`: what an artifact is, the metadata it carries inside, and
whether it agrees with the artifacts.json or bundle manifest.json beside it.

The format comes from the file name, matched against the registry's files (export.registry). Each format's own
module reads its file (`describe`, `read_metadata`) with that format's library. A file the toolkit did not write
is described as far as its format allows, with a note that it carries no toolkit metadata. Exit code 0 when every
file agrees with its manifest, 1 when one does not (altered after export, or metadata that differs), 2 when a file
cannot be read at all (missing, truncated, not that format).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from export.metadata import mismatches
from export.registry import FORMATS, Format, variants
from train.atomic import sha256_file, size_bytes
from train.errors import ToolkitError, cli_errors


class InspectError(ToolkitError, ValueError):
    """A file that cannot be inspected: missing, of no known kind, or unreadable as its format."""


def _suffix(file: str) -> str:
    return "".join(Path(file).suffixes[-2:]) if file.endswith(".torchscript.pt") else Path(file).suffix


SUFFIXES: dict[str, Format] = {}
for _f in FORMATS.values():  # a suffix two formats share (.onnx) belongs to the first registered
    for _v in _f.variants:
        SUFFIXES.setdefault(_suffix(_v.file), _f)
FILES: dict[str, Format] = {v.file: f for f in FORMATS.values() for v in f.variants}


def format_for(path: Path) -> Format:
    """The registered format that writes a file of this name, else the one whose files end like `path` (the
    longest matching ending wins)."""
    if path.name in FILES:
        return FILES[path.name]
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.name.endswith(suffix):
            return SUFFIXES[suffix]
    if path.suffix == ".pt":
        if is_torch_save_file(path):
            raise InspectError(f"{path}: a PyTorch checkpoint or state dict (torch.save), not an exported model; "
                               f"export it first: python -m export --checkpoint {path} --out artifacts/")
        return FORMATS["torchscript"]
    if path.is_dir() and (path / "manifest.json").is_file():
        raise InspectError(f"{path}: a Flutter bundle; check it with python -m mobile_assets --check {path}, or "
                           f"inspect its model files")
    if path.is_dir() and (path / "artifacts.json").is_file():
        raise InspectError(f"{path}: an export folder; inspect its model files, e.g. python -m export.inspect "
                           f"{path}/*.ptl")
    raise InspectError(f"{path}: unknown kind of file; inspect reads {', '.join(sorted({*SUFFIXES, '.pt'}))}")


def is_torch_save_file(path: Path) -> bool:
    """torch.save and TorchScript both write zip archives, often named .pt; only TorchScript's hold
    constants.pkl (and code/)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/data.pkl") for n in names) and not any(n.endswith("/constants.pkl") for n in names)


def _manifest_checks(path: Path, sha256: str, meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Agreement with artifacts.json (sha256 and embedded metadata) and a bundle's manifest.json (sha256)."""
    checks = []
    artifacts = path.parent / "artifacts.json"
    if artifacts.is_file():
        for entry in json.loads(artifacts.read_text(encoding="utf-8")).get("artifacts", {}).values():
            if entry.get("path") == path.name:
                recorded = (entry.get("details") or {}).get("embedded_metadata")
                checks.append({"manifest": str(artifacts), "entry": entry["name"],
                               "sha256_matches": entry.get("sha256") == sha256,
                               "metadata_mismatches": mismatches(meta, recorded) if recorded else []})
    bundle = path.parent / "manifest.json"
    if bundle.is_file():
        for model in json.loads(bundle.read_text(encoding="utf-8")).get("models", []):
            if model.get("file") == path.name:
                checks.append({"manifest": str(bundle), "entry": model.get("name"),
                               "sha256_matches": model.get("sha256") == sha256, "metadata_mismatches": []})
    return checks


def inspect_file(path: str | Path) -> dict[str, Any]:
    """Everything inspect reports about one file, as a dict (the --json output)."""
    path = Path(path)
    if not path.exists():
        raise InspectError(f"{path}: no such file")
    fmt = format_for(path)
    module = importlib.import_module(fmt.module)
    try:
        summary, meta = module.describe(path), module.read_metadata(path)
    except Exception as err:  # truncated, corrupt, or another format under this name
        raise InspectError(f"{path}: cannot be read as {fmt.name} ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no detail'}); "
                           f"the file may be truncated or corrupt: export it again") from err
    known = variants().get((meta or {}).get("artifact", ""))
    precision = (meta or {}).get("precision") or next((v.precision for v in fmt.variants if v.file == path.name), None)
    sha256 = sha256_file(path)  # hashed once: an .mlpackage or .mar is tens of MB
    checks = _manifest_checks(path, sha256, meta)
    return {"file": str(path), "format": fmt.name, "description": fmt.description, "precision": precision,
            "size_bytes": size_bytes(path), "sha256": sha256, "summary": summary,
            "embedded_metadata": meta, "runtime": known.runtime if known else fmt.variants[0].runtime,
            "note": None if meta else "carries no toolkit metadata (not written by this toolkit, or by an older version)",
            "manifest_checks": checks,
            "agrees": all(c["sha256_matches"] and not c["metadata_mismatches"] for c in checks)}


def render(info: dict[str, Any]) -> str:
    meta = info["embedded_metadata"] or {}
    lines = [f"{info['file']}: {info['format']} ({info['description']})",
             f"  precision {info['precision'] or '?'}, runtime {info['runtime']}, {info['size_bytes'] / 1e6:.2f} MB, "
             f"sha256 {info['sha256'][:16]}..."]
    lines += [f"  {k}: {v}" for k, v in info["summary"].items() if k not in ("files", "operators")]
    if meta:
        given = meta["input"]
        shown = f"{given['shape']} {given['layout']} {given['dtype']}" + (
            f" in {given['value_range']}" if given.get("value_range") is not None else "")
        lines.append(f"  metadata: {meta['artifact']}, classes {meta['classes']}, input {shown}, "
                     f"normalization inside (mean {meta['normalization_inside_model']['mean']}), from checkpoint "
                     f"{str(meta['source_checkpoint_sha256'])[:12]}, toolkit {meta['toolkit_version']}, {meta['created']}")
        lines.append(f"  outputs: {meta['outputs']}")
    else:
        lines.append(f"  note: {info['note']}")
    for c in info["manifest_checks"]:
        state = "agrees with" if c["sha256_matches"] and not c["metadata_mismatches"] else "DISAGREES with"
        why = ([] if c["sha256_matches"] else ["sha256 differs (altered after export)"]) + \
            [f"metadata field {m!r} differs" for m in c["metadata_mismatches"]]
        lines.append(f"  {state} {c['manifest']} (entry {c['entry']})" + (f": {'; '.join(why)}" if why else ""))
    return "\n".join(lines)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="artifacts: .ptl, .pt, .onnx, .pte, .mlpackage, .tflite, .mar")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    a = p.parse_args(argv)
    infos = [inspect_file(f) for f in a.files]
    print(json.dumps(infos, indent=2, default=str) if a.json else "\n\n".join(render(i) for i in infos))
    return 0 if all(i["agrees"] for i in infos) else 1


if __name__ == "__main__":
    sys.exit(main())
