"""Write files so a reader never sees half of one: temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from train.errors import ToolkitError


class OutputPathError(ToolkitError, ValueError):
    """An output folder or file that cannot be written: found before any work, named with its flag."""


def check_writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Fail before minutes of work, not after them, when the folder a command will write into cannot be
    written: a file in its place or above it, or a read-only or forbidden place. Creates nothing (a command
    that makes its folder only after checking its other settings keeps doing so)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; pass a folder (it is created if missing)")
    return _writable(path, flag)


def check_writable_file(path: str | Path, flag: str = "--out") -> Path:
    """check_writable_dir for a file a command will write: not a folder, and its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; pass a file name")
    _writable(path.parent, flag, named=path)
    return path


def nearest_existing(path: str | Path) -> Path:
    """`path`, or the closest folder above it that exists (a command's output folder may not exist yet)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def _writable(folder: Path, flag: str, named: Path | None = None) -> Path:
    """Probe `folder`, or the nearest existing folder above it, with a temporary file that leaves no trace."""
    probe = nearest_existing(folder)
    reason = None
    if not probe.is_dir():
        reason = f"{probe} is a file"
    else:
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            reason = err.strerror or str(err)
    if reason:
        raise OutputPathError(f"{flag} {named or folder}: cannot write there ({reason}); choose a writable folder")
    return folder


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, on error removed.

    The temporary name keeps `dest`'s suffix because some writers (torch, onnx, coremltools) pick a
    format from it. It starts with '.' and contains '.partial' so no glob for models picks it up.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = dest.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()  # writers that create directories (.mlpackage) need the name free
    try:
        yield tmp_path
        if dest.is_dir() and not dest.is_symlink():
            import shutil

            shutil.rmtree(dest)
        os.replace(tmp_path, dest)
    except BaseException as err:
        full = isinstance(err, Exception) and disk_full(err, dest.parent)  # measured before the file is removed
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"writing {dest} failed: the disk is full ({full}); free space there or choose "
                                f"another output folder") from err
        raise


class DiskFullError(ToolkitError, OSError):
    """A write that failed for want of space, said in those words: torch's own writers report a full disk as
    'unexpected pos N vs M' or 'PytorchStreamWriter failed writing file' (a RuntimeError), and torch.onnx's
    with no file name."""


FULL_BELOW_BYTES = 16 << 20  # a writer fails once less than its next chunk is left
# how torch's zip writer (torch.save, torch.jit.save, the lite interpreter's) words a failed write
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def disk_full(err: BaseException, folder: Path) -> str | None:
    """How full `folder`'s disk is, when `err` (or an error it came from) was a write that ran out of space: an
    ENOSPC/EDQUOT OSError, or torch's write failure with less than FULL_BELOW_BYTES left. None otherwise."""
    import errno
    import shutil

    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    out_of_space = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    torch_write = any(m in str(e) for e in chain for m in TORCH_WRITE_FAILURES) and free < FULL_BELOW_BYTES
    return f"{free / 1e6:.1f} MB left in {folder}" if out_of_space or torch_write else None


ROOM_MARGIN = 1.1  # room asked beyond an estimate: graphs, headers and the estimate's own error


def require_free_space(folder: str | Path, estimate: int, what: str | Path) -> None:
    """Refuse a write that cannot fit before it starts: on a full disk torch's zip writer can throw from a
    destructor, which aborts the whole process ('terminate called ... unexpected pos', exit 134) instead of
    raising, and leaves its partial file behind. `estimate` is the payload in bytes; a tenth more must be free."""
    import shutil

    needed = int(estimate * ROOM_MARGIN)
    probe = nearest_existing(folder)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(f"writing {what} needs about {needed / 1e6:.0f} MB and the disk holding {probe} has "
                            f"{free / 1e6:.1f} MB left; free space there or choose another output folder")


def remove_partials(folder: str | Path) -> list[str]:
    """Delete the temporary files and folders atomic_path left in `folder` when its writer was killed (a crashed
    worker process cannot clean up); only call it when no writer is running there. Returns their names."""
    import shutil

    gone = []
    for path in Path(folder).glob(".*.partial*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        gone.append(path.name)
    return sorted(gone)


def write_text(dest: str | Path, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(dest: str | Path, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files in sorted order (an .mlpackage is a directory)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
