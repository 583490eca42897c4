"""The artifact manifest: one JSON file per export folder, one entry per exported file.

Every exporter records what it wrote here (format, precision, sha256, size, verification result); the
benchmark stage and the Flutter bundle read only this file, never a directory listing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from train.atomic import sha256_file, size_bytes, write_json
from train.errors import ToolkitError

MANIFEST_NAME = "artifacts.json"
LOCK_NAME = ".artifacts.json.lock"  # held while a row is recorded (parallel exports)
MANIFEST_VERSION = 1
# verified: run in its own runtime on real images (--data) and within its bound;
# exported: written and runs, but checked only on generated or SYNTHETIC inputs (status_reason says which);
# failed:   not written (error says why).
STATUSES = ("verified", "exported", "failed")


class ManifestError(ToolkitError, ValueError):
    """A manifest that is unreadable, or an entry whose file is missing or altered."""


@dataclass
class ArtifactEntry:
    """One exported file. `path` is relative to the manifest's folder.

    `runtime` names the Runner that executes it (see export.runners.RUNNERS); `engine` is the quantized
    engine or execution provider it was built for; `verification` holds what the exporter measured
    against the float model (method, max_abs_logit_diff, top1_agreement, max_prob_change, n_images).
    """

    name: str
    format: str
    precision: str
    runtime: str
    path: str | None
    status: str
    sha256: str | None = None
    size_bytes: int | None = None
    engine: str | None = None
    source_checkpoint_sha256: str | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    status_reason: str | None = None  # why an artifact that runs is 'exported' and not 'verified'
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ManifestError(f"artifact {self.name}: status must be one of {STATUSES}, got {self.status!r}")


def manifest_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest dict ({'manifest_version', 'artifacts': {name: entry}}), empty if none yet."""
    path = manifest_path(out_dir)
    if not path.exists():
        return {"manifest_version": MANIFEST_VERSION, "artifacts": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable artifact manifest ({err}); delete it and export again") from err
    if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
        raise ManifestError(f"{path}: not an artifact manifest (no 'artifacts' object)")
    return data


def entries(out_dir: str | Path) -> list[ArtifactEntry]:
    return [ArtifactEntry(**e) for e in read_manifest(out_dir)["artifacts"].values()]


def describe_file(out_dir: str | Path, file: str | Path) -> dict[str, Any]:
    """path (relative), sha256 and size of an artifact that is already in place."""
    file = Path(file)
    return {"path": str(file.relative_to(out_dir)) if file.is_absolute() or Path(out_dir) in file.parents
            else str(file), "sha256": sha256_file(file), "size_bytes": size_bytes(file)}


@contextlib.contextmanager
def _locked(out_dir: str | Path) -> Iterator[None]:
    """An exclusive lock around the manifest's read-modify-write: a parallel export's workers record their
    rows at the same time (POSIX flock; elsewhere exports run in one process)."""
    try:
        import fcntl
    except ImportError:  # Windows: `python -m export` runs one job there
        yield
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record(out_dir: str | Path, entry: ArtifactEntry) -> Path:
    """Insert or replace one entry, atomically and under the manifest lock."""
    with _locked(out_dir):
        data = read_manifest(out_dir)
        data["manifest_version"] = MANIFEST_VERSION
        data["artifacts"][entry.name] = asdict(entry)
        data["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return write_json(manifest_path(out_dir), data)


def record_source(out_dir: str | Path, source: dict[str, Any]) -> Path:
    """What the entries were exported from and checked on (checkpoint, spec, data, the verification images),
    so the Flutter bundle and the benchmark can be built from this file alone."""
    return record_field(out_dir, "source", source)


def record_field(out_dir: str | Path, key: str, value: Any) -> Path:
    """One top-level field of the manifest (its source, the last export's timing), atomically."""
    with _locked(out_dir):
        data = read_manifest(out_dir)
        data["manifest_version"] = MANIFEST_VERSION
        data[key] = value
        return write_json(manifest_path(out_dir), data)


def read_source(out_dir: str | Path) -> dict[str, Any]:
    """The manifest's source block; a manifest written before it existed says how to get one."""
    if not manifest_path(out_dir).is_file():
        raise ManifestError(f"no artifacts.json in {out_dir}; export first (python -m export, or python -m "
                            f"export.lite --no-bundle) or point --artifacts at the export folder")
    source = read_manifest(out_dir).get("source")
    if not isinstance(source, dict):
        raise ManifestError(f"{manifest_path(out_dir)} records no source (checkpoint, spec, verification images); "
                            f"export again with this version of the toolkit")
    return source


def verify_file(out_dir: str | Path, entry: ArtifactEntry) -> Path:
    """The artifact's absolute path, after checking it exists and its sha256 matches the manifest."""
    if entry.path is None:
        raise ManifestError(f"artifact {entry.name}: no file was written ({entry.error or entry.status})")
    path = Path(out_dir) / entry.path
    if not path.exists():
        raise ManifestError(f"artifact {entry.name}: {path} is missing; export it again")
    if entry.sha256 and sha256_file(path) != entry.sha256:
        raise ManifestError(f"artifact {entry.name}: {path} was altered after export (sha256 mismatch); "
                            f"export it again")
    return path
