"""Finding labelled radiographs on disk, splitting them, and reading them as model input.

Layouts read (first match wins):
  * a CSV file `path,label[,split][,source]` with paths relative to the CSV's folder (or --data-root);
  * a folder holding `labels.csv` in that form (cxr4 ships one, with split and source);
  * the COVID-19 Radiography Database layout `<Class>/images/<file>` (class names may contain spaces);
  * a plain `<Class>/<file>` folder (images in its subfolders too);
  * either inside split folders, `<split>/<Class>/...` (train, val, test; also valid, validation, dev, ...).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.errors import ToolkitError
from train.lookalike import LOOKALIKE_BITS, group_representatives, look_hash, lookalike_pairs
from train.spec import (DEFAULT_CLASSES, ImageReadError, PreprocessSpec, check_and_look, check_decodes,
                        load_unit_image, unreadable)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
SPLITS = ("train", "val", "test")
# the names data sets give their splits (Kaggle's chest_xray: train/val/test; others valid, validation, dev),
# in a CSV's split column or as the top folders of <split>/<Class>/ (any case)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
# a labels CSV's column naming the patient (NIH ChestX-ray14 'Patient ID', RSNA 'patientId', MIMIC 'subject_id')
PATIENT_COLUMNS = ("patient", "patient_id", "patient id", "patientid", "subject_id", "subject")
GENERATED_SPLIT = "+generated-split"  # appended to DatasetIndex.layout where assign_splits made the split
# Written by train.synthetic into every dataset it generates: images under it are never called real.
SYNTHETIC_MARKER = "SYNTHETIC"


class DataError(ToolkitError, ValueError):
    """Data that cannot be used as given; the message names the file, class or flag."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    split: str | None = None
    source: str | None = None
    patient: str | None = None  # from a CSV's patient column: a patient's images stay in one generated split
    cohort: str | None = None  # from a CSV's cohort column (cxr4's): the explanation's per-cohort audit


@dataclass
class DatasetIndex:
    """Every labelled image found, with the class order that labels index into."""

    root: Path
    class_names: tuple[str, ...]
    samples: list[Sample]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    washed_out: list[tuple[str, str]] = field(default_factory=list)  # (path, what 8 bits lose): check_images
    unknown_classes: dict[str, int] = field(default_factory=dict)  # class folders not of the model: images left out

    @property
    def has_split(self) -> bool:
        return all(s.split is not None for s in self.samples)

    @property
    def split_generated(self) -> bool:
        """Whether assign_splits made the split (the data gave none)."""
        return self.layout.endswith(GENERATED_SPLIT)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise DataError(f"--split must be one of {SPLITS}, got {name!r}")
        return [s for s in self.samples if s.split == name]

    def require_split(self, name: str) -> list[Sample]:
        """The images of split `name` (--split), or an error naming the splits the data has."""
        samples = self.split(name)
        if not samples:
            present = sorted({s.split for s in self.samples if s.split})
            raise DataError(f"--split {name}: {self.root} has no images in that split; pick --split from {present}")
        return samples

    def fingerprint(self) -> str:
        """Changes whenever any file, label or split assignment changes."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            rel = s.path.relative_to(self.root) if s.path.is_relative_to(self.root) else s.path
            h.update(f"{rel}\t{self.class_names[s.label]}\t{s.split}\n".encode())
        return h.hexdigest()

    def counts(self, split: str | None = None) -> dict[str, int]:
        samples = self.samples if split is None else self.split(split)
        return {c: sum(1 for s in samples if s.label == i) for i, c in enumerate(self.class_names)}


def _order_classes(found: Sequence[str], class_names: Sequence[str] | None) -> tuple[str, ...]:
    """Fixed once: a given order (from a checkpoint) wins; the cxr4 set keeps its canonical order."""
    if class_names is not None:
        return tuple(class_names)
    if set(found) == set(DEFAULT_CLASSES):
        return DEFAULT_CLASSES
    return tuple(sorted(found))


def split_named(name: str) -> str | None:
    """The split a data set's name for it means ('Validation' -> 'val'), None for a name that is no split."""
    return SPLIT_NAMES.get(name.lower())


def _csv_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a labels CSV as a spreadsheet saves it too: a UTF-8 byte-order mark (Excel's 'CSV UTF-8'),
    ';' or tab as the delimiter (Excel where the decimal mark is a comma), header names in any case, spaces
    around values, empty rows. Each with its line number; column names come back lower-case, values stripped."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                        f"save it as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)')") from err
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
    if not {"path", "label"} <= set(fields):
        raise DataError(f"{csv_path}: needs columns 'path' and 'label' (found {sorted(set(fields))})")
    reader.fieldnames = fields
    rows = []
    for row in reader:
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if any(values.values()):
            rows.append((reader.line_num, values))
    return rows


def _csv_image_path(root: Path, written: str) -> Path:
    """A path as the CSV gives it, relative to `root`; Windows separators work where the file is not found
    with them (a CSV written on Windows)."""
    path = root / written
    if "\\" in written and not path.exists():
        return root / written.replace("\\", "/")
    return path


def _read_csv(csv_path: Path, root: Path, class_names: Sequence[str] | None) -> DatasetIndex:
    rows = _csv_rows(csv_path)
    if not rows:
        raise DataError(f"{csv_path}: has a header but no rows")
    for column in ("path", "label"):
        blank = [line for line, r in rows if not r[column]]
        if blank:
            more = f" (and {len(blank) - 1} more rows)" if len(blank) > 1 else ""
            raise DataError(f"{csv_path} line {blank[0]}{more}: no {column}; give every row a {column}, or leave "
                            f"{'unlabelled images' if column == 'label' else 'such rows'} out of the CSV")
    classes = _order_classes(sorted({r["label"] for _, r in rows}), class_names)
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for line, r in rows:
        if r["label"] not in index:
            raise DataError(f"{csv_path} line {line}: unknown label {r['label']!r}; "
                            f"known classes are {list(classes)}")
        written = r.get("split") or None
        split = None if written is None else split_named(written)
        if written is not None and split is None:
            raise DataError(f"{csv_path} line {line}: split {written!r} is not one of {SPLITS} (or "
                            f"{', '.join(k for k in SPLIT_NAMES if k not in SPLITS)})")
        patient = next((r[c] for c in PATIENT_COLUMNS if r.get(c)), None)
        samples.append(Sample(_csv_image_path(root, r["path"]), index[r["label"]], split, (r.get("source") or None),
                              patient, r.get("cohort") or None))
    return DatasetIndex(root, classes, samples, "csv")


def _is_metadata(path: Path) -> bool:
    """Files and folders that are never X-rays: hidden ones (.DS_Store, and the '._name.png' AppleDouble files
    that unzipping a macOS archive leaves beside each image, which carry an image suffix but no image) and the
    __MACOSX folder of such an archive, which would otherwise become a class."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def _image_folder(class_folder: Path) -> Path:
    """Where a class's images are: <Class>/images/ (COVID-19 Radiography layout) or <Class>/ itself."""
    return class_folder / "images" if (class_folder / "images").is_dir() else class_folder


def _files_under(folder: Path) -> list[Path]:
    """Every file in `folder` and its subfolders (as torchvision's ImageFolder reads a class: images are often
    kept in one subfolder per source or batch), sorted, without metadata files and folders."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _is_metadata(Path(d)))
        found += [Path(here) / f for f in files if not _is_metadata(Path(f))]
    return sorted(found)


def _class_images(class_folder: Path) -> list[Path]:
    """The images of one class folder, its subfolders included, sorted."""
    return [p for p in _files_under(_image_folder(class_folder)) if p.suffix.lower() in IMAGE_SUFFIXES]


def _split_folders(root: Path, dirs: Sequence[Path]) -> dict[str, Path] | None:
    """{split: folder} where every top folder is named as a split (`train/ val/ test/`, each holding
    `<Class>/`), None where none is; a mix of split and class folders is an error, since either reading of it
    would be wrong."""
    named = {d: split_named(d.name) for d in dirs}
    if not any(named.values()):
        return None
    others = [d.name for d, split in named.items() if split is None]
    if others:
        raise DataError(f"{root}: folders {[d.name for d, s in named.items() if s]} are named as splits and "
                        f"{others} are not; use <split>/<Class>/ or <Class>/ folders throughout, or a labels.csv")
    splits: dict[str, Path] = {}
    for d, split in named.items():
        if split in splits:
            raise DataError(f"{root}: {splits[split].name}/ and {d.name}/ are both the {split} split; merge them")
        splits[split] = d
    return splits


def _read_split_folders(root: Path, splits: dict[str, Path], class_names: Sequence[str] | None) -> DatasetIndex:
    """`<split>/<Class>/<file>` (or `<split>/<Class>/images/<file>`): each image's split is its top folder."""
    found = {split: sorted(d.name for d in folder.iterdir() if d.is_dir() and not _is_metadata(d))
             for split, folder in splits.items()}
    classes = _order_classes(sorted({c for names in found.values() for c in names}), class_names)
    samples = []
    for split, folder in sorted(splits.items(), key=lambda kv: SPLITS.index(kv[0])):
        for i, name in enumerate(classes):
            if (folder / name).is_dir():
                samples += [Sample(p, i, split) for p in _class_images(folder / name)]
    unknown = _unknown_classes([folder / n for split, folder in splits.items() for n in found[split]], classes)
    return DatasetIndex(root, classes, samples, "split-folders", unknown_classes=unknown)


def _read_folders(root: Path, class_names: Sequence[str] | None) -> DatasetIndex:
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not _is_metadata(d))
    splits = _split_folders(root, dirs)
    if splits:
        return _read_split_folders(root, splits, class_names)
    if not dirs:
        raise DataError(f"{root}: no class folders found; expected <Class>/images/<file>, "
                        f"<Class>/<file> or a labels.csv")
    classes = _order_classes([d.name for d in dirs], class_names)
    layout = "covid19-radiography" if any((d / "images").is_dir() for d in dirs) else "class-folders"
    samples = []
    for i, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root}: class folder {name!r} is missing (the model's classes are "
                            f"{list(classes)})")
        samples += [Sample(p, i) for p in _class_images(folder)]
    return DatasetIndex(root, classes, samples, layout, unknown_classes=_unknown_classes(dirs, classes))


def _unknown_classes(folders: Sequence[Path], classes: Sequence[str]) -> dict[str, int]:
    """Class folders with images whose class the model (a checkpoint's class names) does not have: their images
    are left out, and said to be (a 3-class model on the 4-class COVID-19 Radiography Database, say)."""
    unknown: dict[str, int] = {}
    for folder in folders:
        if folder.name not in classes:
            count = len(_class_images(folder))
            if count:
                unknown[folder.name] = unknown.get(folder.name, 0) + count
    if unknown:
        log.warning("left out %s: not classes of the model, whose classes are %s",
                    ", ".join(f"class folder {n!r} ({k} images)" for n, k in unknown.items()), list(classes))
    return unknown


def check_data_path(data: str | Path) -> Path:
    """--data must exist: checked before anything is written (a training run checks it before making its folder)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder")
    return data


def discover(data: str | Path, class_names: Sequence[str] | None = None,
             data_root: str | Path | None = None) -> DatasetIndex:
    """Index a dataset in any supported layout and check every class has images."""
    data = check_data_path(data)
    if data.is_file():
        if data.suffix.lower() != ".csv":
            unpack = _unpack_command(data)
            if unpack:  # how Kaggle and most collections come
                raise DataError(f"--data {data}: an archive; unpack it first (`{unpack}`) and pass the folder in it "
                                f"that holds the class folders")
            raise DataError(f"--data {data}: a file must be a CSV with path,label[,split] columns")
        idx = _read_csv(data, Path(data_root) if data_root else data.parent, class_names)
    elif (data / "labels.csv").is_file():
        idx = _read_csv(data / "labels.csv", Path(data_root) if data_root else data, class_names)
    else:
        idx = _read_folders(data, class_names)
    empty = [c for c, n in idx.counts().items() if n == 0]
    if empty:
        raise DataError(f"{data}: class {empty[0]!r} has no images" + (f" (also empty: {empty[1:]})" if
                        empty[1:] else "") + _what_is_there(idx, empty[0]) + "; every class needs images")
    return idx


def _unpack_command(path: Path) -> str | None:
    """The command that unpacks a zip or tar archive next to itself; None for any other file."""
    import shlex
    import tarfile
    import zipfile

    src, dest = shlex.quote(str(path)), shlex.quote(str(path.parent / "data"))
    try:
        if zipfile.is_zipfile(path):
            return f"python -m zipfile -e {src} {dest}"
        if tarfile.is_tarfile(path):
            return f"mkdir -p {dest} && tar -xf {src} -C {dest}"
    except OSError:
        pass
    return None


def _what_is_there(idx: DatasetIndex, name: str) -> str:
    """For a class folder without images: the files it holds instead (DICOM exports, say), and what is read."""
    if idx.layout not in ("covid19-radiography", "class-folders"):
        return ""
    folder = _image_folder(idx.root / name)
    suffixes = Counter(p.suffix.lower() or "(none)" for p in _files_under(folder))
    if not suffixes:
        return f"; its folder {folder} is empty"
    found = ", ".join(f"{n} {suffix}" for suffix, n in suffixes.most_common(3))
    hint = " (DICOM: convert to PNG first, e.g. with pydicom)" if ".dcm" in suffixes else ""
    return (f"; its folder {folder} holds {found} files, none of them an image the toolkit reads "
            f"({' '.join(sorted(IMAGE_SUFFIXES))}){hint}")


def check_split_fractions(val_frac: float, test_frac: float) -> None:
    """The shares of a generated split: some validation, optional test, and train left over."""
    if not (0 <= test_frac < 1 and 0 < val_frac < 1 and val_frac + test_frac < 1):
        raise DataError(f"--val-frac {val_frac} and --test-frac {test_frac} must be fractions with "
                        f"0 < val, 0 <= test and val + test < 1")


def file_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or None where it cannot be read (check_images names such files)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _digest(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _digest(path: str, mtime_ns: int, size: int) -> str | None:
    """Keyed by modification time and size too, so a file changed since is read again."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def first_copies(samples: Sequence[Sample]) -> list[int]:
    """For each sample, the position of the first byte-identical file among `samples` (its own where unique)."""
    first: dict[str, int] = {}
    return [i if d is None else first.setdefault(d, i) for i, d in enumerate(file_digest(s.path) for s in samples)]


def checked_image(path: str | Path) -> tuple[str | None, bytes]:
    """(what 8 bits lose, perceptual hash) of an image, from one decode, cached while the file is unchanged;
    an unreadable file raises ImageReadError naming it."""
    try:
        st = Path(path).stat()
    except OSError as err:
        raise ImageReadError(unreadable(path, err)) from err
    return _checked(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _checked(path: str, mtime_ns: int, size: int) -> tuple[str | None, bytes]:
    return check_and_look(path, look_hash)


def _look_or_none(path: Path) -> bytes | None:
    try:
        return checked_image(path)[1]
    except (OSError, ImageReadError):  # check_images names such files
        return None


def lookalikes(samples: Sequence[Sample], progress: bool = False,
               against: Sequence[Sample] | None = None) -> list[tuple[int, int, int]]:
    """Pairs (i, j, differing bits) of samples that are one radiograph in two files (train.lookalike), not
    byte-identical ones, which first_copies finds; with `against`, pairs of samples[i] and against[j]."""
    from tqdm import tqdm

    everything = [*samples, *(against or [])]
    looks = [_look_or_none(s.path) for s in tqdm(everything, desc="hashing images", unit="img", disable=not progress,
                                                 leave=False)]
    digests = [file_digest(s.path) for s in everything]
    n = len(samples)
    if against is None:
        pairs = lookalike_pairs(looks)
    else:  # positions in `everything` while the digests are compared, then in `against`
        pairs = [(i, n + j, d) for i, j, d in lookalike_pairs(looks[:n], against=looks[n:])]
    kept = [(i, j, d) for i, j, d in pairs if digests[i] is None or digests[i] != digests[j]]
    return kept if against is None else [(i, j - n, d) for i, j, d in kept]


def same_patient(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """Links from each sample to the first sample of its patient (where the data names patients)."""
    first: dict[str, int] = {}
    links = []
    for i, s in enumerate(samples):
        if s.patient is not None and first.setdefault(s.patient, i) != i:
            links.append((i, first[s.patient]))
    return links


def copy_groups(samples: Sequence[Sample], progress: bool = False) -> list[int]:
    """For each sample, the first position of its group: byte-identical files, look-alikes and one patient's
    images together."""
    first = first_copies(samples)
    links = [(i, first[i]) for i in range(len(samples)) if first[i] != i] + same_patient(samples)
    return group_representatives(len(samples), links + [(i, j) for i, j, _ in lookalikes(samples, progress)])


def patients_across_splits(samples: Sequence[Sample], root: Path) -> dict[str, Any]:
    """Patients (named by the data) with images in two splits: a val or test image of a patient the model trained
    on. Counts and a few examples."""
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        if s.patient is not None:
            by_patient.setdefault(s.patient, []).append(s)
    across = [(p, g) for p, g in by_patient.items() if len({s.split for s in g}) > 1]
    examples = [[f"patient {p}: " + ", ".join(f"{_shown(s, root)} ({s.split})" for s in g[:3])] for p, g in across[:3]]
    return {"patients": len(by_patient), "across_splits": len(across), "examples_across_splits": examples}


def _shown(s: Sample, root: Path) -> str:
    """A sample's path as a message shows it: relative to the data's root where it lies inside."""
    return str(s.path.relative_to(root)) if s.path.is_relative_to(root) else str(s.path)


def identical_files(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Groups (two or more each, in index order) of byte-identical files: one image filed twice."""
    return _groups_of(samples, first_copies(samples))


def _groups_of(samples: Sequence[Sample], firsts: Sequence[int]) -> list[list[Sample]]:
    """The groups of two or more samples that share a first position (first_copies, group_representatives)."""
    groups: dict[int, list[Sample]] = {}
    for s, first in zip(samples, firsts):
        groups.setdefault(first, []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def duplicate_summary(idx: DatasetIndex, progress: bool = False) -> dict[str, Any]:
    """Byte-identical files in the data: how many groups, how many of them span two splits (a val or test
    image the model trained on) or two classes (contradictory labels), with a few examples of each; and the
    same for look-alikes (one radiograph re-encoded, resized or re-contrasted: train.lookalike), under
    `lookalike`; and patients with images in two splits, under `patients`."""

    def rel(s: Sample) -> str:
        return _shown(s, idx.root)

    def summary(groups: list[list[Sample]]) -> dict[str, Any]:
        across = [g for g in groups if len({s.split for s in g}) > 1]
        conflicting = [g for g in groups if len({s.label for s in g}) > 1]
        return {
            "groups": len(groups), "extra_copies": sum(len(g) - 1 for g in groups),
            "across_splits": len(across), "conflicting_labels": len(conflicting),
            "examples_across_splits": [[f"{rel(s)} ({s.split})" for s in g] for g in across[:3]],
            "examples_conflicting_labels": [[f"{rel(s)} ({idx.class_names[s.label]})" for s in g]
                                            for g in conflicting[:3]],
        }

    pairs = lookalikes(idx.samples, progress)
    linked = group_representatives(len(idx.samples), [(i, j) for i, j, _ in pairs])
    return {**summary(identical_files(idx.samples)),
            "lookalike": {**summary(_groups_of(idx.samples, linked)), "max_bits": LOOKALIKE_BITS},
            "patients": patients_across_splits(idx.samples, idx.root)}


def duplicate_warnings(summary: dict[str, Any]) -> list[str]:
    """What a user must hear about duplicate_summary's findings, one sentence each."""
    lines = []
    if summary["across_splits"]:
        lines.append(f"{summary['across_splits']} image(s) are byte-identical files in two splits (e.g. "
                     f"{' = '.join(summary['examples_across_splits'][0])}): val and test metrics count them as "
                     f"unseen; keep each image in one split (a generated split does)")
    if summary["conflicting_labels"]:
        lines.append(f"{summary['conflicting_labels']} image(s) are byte-identical files under different classes "
                     f"(e.g. {' = '.join(summary['examples_conflicting_labels'][0])}): contradictory labels; "
                     f"keep the right one")
    patients = summary.get("patients") or {}
    if patients.get("across_splits"):
        lines.append(f"{patients['across_splits']} of {patients['patients']} patients have images in two splits "
                     f"({patients['examples_across_splits'][0][0]}): val and test metrics count a patient the model "
                     f"trained on as unseen; keep each patient in one split (a generated split does)")
    look = summary.get("lookalike") or {}
    if look.get("across_splits"):
        lines.append(f"{look['across_splits']} image(s) look like an image of another split (the same radiograph "
                     f"re-encoded, resized or re-contrasted: perceptual hashes within {look['max_bits']} of 256 bits; "
                     f"e.g. {' ~ '.join(look['examples_across_splits'][0])}): val and test metrics count them as "
                     f"unseen; keep each radiograph in one split (a generated split does)")
    if look.get("conflicting_labels"):
        lines.append(f"{look['conflicting_labels']} image(s) look like an image of another class (e.g. "
                     f"{' ~ '.join(look['examples_conflicting_labels'][0])}): one radiograph with two labels; "
                     f"keep the right one")
    return lines


def assign_splits(idx: DatasetIndex, seed: int = 0, val_frac: float = 0.15,
                  test_frac: float = 0.15, progress: bool = False) -> DatasetIndex:
    """Stratified, seeded train/val/test split where the data gives none; the assignment is recorded
    in every checkpoint through the split fingerprint and in the run folder as splits.csv.

    Byte-identical files, look-alikes (train.lookalike) and the images of one patient (where a CSV names
    patients) go to one split together (each follows the first of its group, which is split like any image), so
    no val or test image is a copy of a train image or of a patient trained on. Data without any of these splits
    as it did before."""
    if idx.has_split:
        return idx
    from sklearn.model_selection import train_test_split

    first = copy_groups(idx.samples, progress)
    positions = np.array(sorted(set(first)), dtype=int)
    labels = [idx.samples[i].label for i in positions]
    check_split_fractions(val_frac, test_frac)
    try:
        if test_frac > 0:
            rest, test = train_test_split(positions, test_size=test_frac, stratify=labels, random_state=seed)
        else:  # no test part wanted: everything not in val trains
            rest, test = positions, np.array([], dtype=int)
        label_of = dict(zip(positions.tolist(), labels))
        train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac),
                                      stratify=[label_of[int(i)] for i in rest], random_state=seed)
    except ValueError as err:
        raise DataError(f"{idx.root}: too few images per class for a stratified split ({err}); "
                        f"add images or give a split column") from err
    names = {**{int(i): "train" for i in train}, **{int(i): "val" for i in val}, **{int(i): "test" for i in test}}
    samples = [replace(s, split=names[first[i]]) for i, s in enumerate(idx.samples)]
    return replace(idx, samples=samples, layout=idx.layout + GENERATED_SPLIT)


def write_splits_csv(idx: DatasetIndex, dest: Path) -> None:
    from train.atomic import atomic_path

    # the data's source, patient and cohort columns are kept: evaluations and explanations of the run read them
    extra = [k for k in ("source", "patient", "cohort") if any(getattr(s, k) is not None for s in idx.samples)]
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", *extra])
        for s in idx.samples:
            w.writerow([s.path, idx.class_names[s.label], s.split, *(getattr(s, k) or "" for k in extra)])


def check_images(idx: DatasetIndex, skip_bad: bool = False, progress: bool = True) -> DatasetIndex:
    """Decode every image once before training so a bad file stops the run at the start, not hours in."""
    from tqdm import tqdm

    good, bad, washed_out = [], [], []
    for s in tqdm(idx.samples, desc="checking images", unit="img", disable=not progress, leave=False):
        try:
            lost = checked_image(s.path)[0]  # the perceptual hash comes from this decode too (copy_groups)
            good.append(s)
            if lost:
                washed_out.append((str(s.path), lost))
        except ImageReadError as err:
            if not skip_bad:
                raise DataError(f"{err}, or pass --skip-bad to leave such files out") from err
            cause = err.__cause__
            bad.append((str(s.path), f"{type(cause).__name__}: {cause}"))
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), ", ".join(p for p, _ in bad[:10]))
    if washed_out:
        log.warning("%s", washed_out_warning(washed_out, len(good)))
    return replace(idx, samples=good, skipped=idx.skipped + bad, washed_out=washed_out)


def washed_out_warning(washed_out: Sequence[tuple[str, str]], total: int) -> str:
    """One sentence for the images whose 8-bit conversion loses most of them, with the first as example."""
    path, lost = washed_out[0]
    return (f"{len(washed_out)} of {total} images lose most of their gray levels in the conversion to 8 bits (e.g. "
            f"{path}: {lost}): the model would learn from nearly black or white pictures; write 12-bit data "
            f"scaled to the full 16-bit range (value x 16), or 8-bit images with the window you read them with")


class ImageDataset:
    """A torch Dataset of (float tensor (3, H, W) in [0, 1], label). Normalization happens in the model.

    Training augmentation runs on the one gray channel and is then repeated to 3 (a third of the work,
    the same result). An item key may be `(index, seed)` (from EpochSampler(with_seeds=True)): the
    augmentation then draws from that seed alone, in whichever loader worker runs it."""

    def __init__(self, samples: Sequence[Sample], spec: PreprocessSpec, augment=None) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        import torch

        i, seed = key if isinstance(key, tuple) else (key, None)
        s = self.samples[i]
        x = torch.from_numpy(load_unit_image(s.path, self.spec))
        if self.augment is not None:
            x = self._augment_gray(x[:1], seed).expand(3, -1, -1).contiguous()
        return x, s.label

    def _augment_gray(self, gray, seed: int | None):
        import torch

        if seed is None:
            return self.augment(gray)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.augment(gray)


def load_batch(samples: Sequence[Sample], spec: PreprocessSpec) -> np.ndarray:
    """Stack samples into one float32 (N, 3, H, W) array in [0, 1]: the input every runtime takes."""
    return np.stack([load_unit_image(s.path, spec) for s in samples]).astype(np.float32)


def seeded_subset(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A reproducible sample of at most n: shuffled per class, then one of each class in turn, so classes are
    as equal as the samples allow (class-balanced, not proportional to the classes' shares)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    for lst in by_class.values():
        rng.shuffle(lst)
    out: list[Sample] = []
    queues = [by_class[k] for k in sorted(by_class)]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def labelled_splits(data: str | Path, class_names: Sequence[str] | None = None, seed: int = 0) -> DatasetIndex:
    """--data indexed in the model's class order, with the seeded stratified split `python -m train` makes
    when the data has no split of its own: every stage reads train, val and test the same way."""
    idx = discover(data, class_names)
    return idx if idx.has_split else assign_splits(idx, seed=seed)


def verification_sets(data: str | Path, class_names: Sequence[str], calib_size: int,
                      eval_size: int) -> tuple[list[Sample], list[Sample]]:
    """(val subset that verifies artifacts, train subset that calibrates int8): one seed each, the same
    for every command, so `python -m export` and `python -m export.lite` check on the same images. Every
    chosen image is decoded once here, so an unreadable one stops the command before it writes anything."""
    idx = labelled_splits(data, class_names)
    train, val = idx.split("train"), idx.split("val") or idx.split("test")
    if not train or not val:
        raise DataError(f"--data {data}: needs train and val images (found {len(train)} train, {len(val)} val)")
    chosen = seeded_subset(val, eval_size, seed=1), seeded_subset(train, calib_size, seed=0)
    for s in (*chosen[0], *chosen[1]):
        check_decodes(s.path)
    return chosen


@functools.lru_cache(maxsize=4096)
def _marked_synthetic(folder: Path) -> bool:
    return any((d / SYNTHETIC_MARKER).is_file() for d in (folder, *list(folder.parents)[:3]))


def images_origin(samples: Sequence[Sample] | None) -> str:
    """'real' for images a user passed with --data, 'synthetic' when any of them lies in a dataset that
    train.synthetic generated (its SYNTHETIC marker file), 'none' for no images.

    The toolkit cannot see what an image shows; it can know which images it made itself, and those
    never make an artifact 'verified'."""
    if not samples:
        return "none"
    return "synthetic" if any(_marked_synthetic(Path(s.path).resolve().parent) for s in samples) else "real"
