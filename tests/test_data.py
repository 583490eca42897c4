"""Data layouts, generated splits and every bad-data error, on tiny SYNTHETIC images."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from train.data import (DataError, assign_splits, check_images, discover, duplicate_summary,
                        duplicate_warnings, load_batch)
from train.spec import DEFAULT_CLASSES
from train.synthetic import make_synthetic_dataset


def _write_csv(path: Path, rows: list[dict], fields=("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(root: Path, with_split: bool) -> list[dict]:
    rows = []
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        row = {"path": str(p.relative_to(root)), "label": p.parts[len(root.parts)]}
        if with_split:
            row["split"] = "val" if i % 4 == 0 else "train"
        rows.append(row)
    return rows


def test_covid19_layout_with_spaces(synthetic_data):
    idx = discover(synthetic_data)
    assert idx.layout == "covid19-radiography"
    assert idx.class_names == DEFAULT_CLASSES and "Viral Pneumonia" in idx.class_names
    assert idx.counts() == {c: 12 for c in DEFAULT_CLASSES}
    assert not idx.has_split


def test_plain_folders_sorted_classes(tmp_path):
    root = make_synthetic_dataset(tmp_path / "plain", per_class=3, size=32, classes=("zeta", "alpha"),
                                  layout="plain")
    idx = discover(root)
    assert idx.layout == "class-folders"
    assert idx.class_names == ("alpha", "zeta")
    assert all(s.path.parent.name == idx.class_names[s.label] for s in idx.samples)


@pytest.mark.parametrize("layout", ["plain", "covid19"])
def test_a_folder_unzipped_from_a_macos_archive_reads_as_its_classes(tmp_path, layout):
    """A zip made on a Mac unzips with a __MACOSX folder (which became a class with no images: an error) and,
    with some tools, a '._name.png' AppleDouble file beside each image (an image suffix, no image: an
    unreadable-image error in every command), plus .DS_Store files. None of them is data."""
    root = make_synthetic_dataset(tmp_path / "mac", per_class=3, size=32, classes=("alpha", "zeta"), layout=layout)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    for image in list(root.rglob("*.png")):
        (image.parent / f"._{image.name}").write_bytes(apple_double)
        mirror = root / "__MACOSX" / image.relative_to(root).parent
        mirror.mkdir(parents=True, exist_ok=True)
        (mirror / f"._{image.name}").write_bytes(apple_double)
        (image.parent / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    idx = check_images(discover(root))
    assert idx.class_names == ("alpha", "zeta") and idx.counts() == {"alpha": 3, "zeta": 3}
    assert not any(s.path.name.startswith(".") for s in idx.samples)


@pytest.mark.parametrize("with_split", [True, False])
def test_csv_with_and_without_split(synthetic_data, tmp_path, with_split):
    fields = ("path", "label", "split") if with_split else ("path", "label")
    csv_path = _write_csv(tmp_path / "list.csv", _rows(synthetic_data, with_split), fields)
    idx = discover(csv_path, data_root=synthetic_data)
    assert idx.layout == "csv" and len(idx.samples) == 48
    assert idx.has_split is with_split
    if with_split:
        assert len(idx.split("val")) == 12


def test_labels_csv_in_folder(synthetic_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_data, root)
    _write_csv(root / "labels.csv", _rows(root, True))
    idx = discover(root)
    assert idx.layout == "csv" and idx.has_split and idx.class_names == DEFAULT_CLASSES


def test_a_labels_csv_saved_by_a_spreadsheet_reads_like_a_plain_one(synthetic_data, tmp_path):
    """Excel's 'CSV UTF-8' starts with a byte-order mark (the header then read '\\ufeffpath', and the error
    listed a 'path' column the user could see), uses ';' where the decimal mark is a comma, and keeps a
    typed header's case and spaces; a CSV written on Windows has backslashes in its paths. Each failed before,
    and a trailing space made 'COVID ' a fifth class."""
    rows = _rows(synthetic_data, with_split=True)
    plain = discover(_write_csv(tmp_path / "plain.csv", rows), data_root=synthetic_data)
    lines = ["Path ; Label ;Split"] + [f"{r['path'].replace('/', chr(92))};{r['label']} ; {r['split']}" for r in rows]
    (tmp_path / "excel.csv").write_bytes("\r\n".join(lines).encode("utf-8-sig") + b"\r\n\r\n")
    excel = discover(tmp_path / "excel.csv", data_root=synthetic_data)
    assert excel.class_names == plain.class_names == DEFAULT_CLASSES
    assert [(s.path, s.label, s.split) for s in excel.samples] == [(s.path, s.label, s.split) for s in plain.samples]
    assert all(s.path.is_file() for s in excel.samples)


def test_a_labels_csv_in_another_encoding_is_named_with_the_fix(synthetic_data, tmp_path):
    (tmp_path / "latin.csv").write_bytes("path,label\nx.png,Neumonía viral\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text .*save it as UTF-8 \(in Excel: 'CSV UTF-8"):
        discover(tmp_path / "latin.csv")


def test_an_archive_passed_as_data_says_how_to_unpack_it_and_the_command_works(synthetic_data, tmp_path):
    """Collections come as a zip (Kaggle) or a tarball: '--data X.zip' said 'a file must be a CSV'."""
    import subprocess
    import sys
    import tarfile
    import zipfile

    zipped = tmp_path / "my downloads" / "COVID-19_Radiography_Dataset.zip"
    zipped.parent.mkdir()
    with zipfile.ZipFile(zipped, "w") as z:
        for f in sorted(synthetic_data.rglob("*.png")):
            z.write(f, f.relative_to(synthetic_data.parent))
    with pytest.raises(DataError, match=r"COVID-19_Radiography_Dataset.zip: an archive; unpack it first") as err:
        discover(zipped)
    command = str(err.value).split("`")[1]  # run as written (its paths hold a space), with this Python
    assert command.startswith("python -m zipfile -e ")
    subprocess.run(sys.executable + command[len("python"):], shell=True, check=True)
    unpacked = zipped.parent / "data" / synthetic_data.name
    assert discover(unpacked).counts() == discover(synthetic_data).counts()  # the folder in it reads as the data
    with tarfile.open(tmp_path / "cxr.tar.gz", "w:gz") as t:
        t.add(synthetic_data, arcname="cxr")
    with pytest.raises(DataError, match=r"cxr.tar.gz: an archive; unpack it first \(`mkdir -p .* && tar -xf "):
        discover(tmp_path / "cxr.tar.gz")
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="a file must be a CSV"):
        discover(tmp_path / "notes.txt")


def test_generated_split_is_stratified_and_reproducible(synthetic_data):
    a = assign_splits(discover(synthetic_data), seed=3)
    b = assign_splits(discover(synthetic_data), seed=3)
    c = assign_splits(discover(synthetic_data), seed=4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    for split in ("train", "val", "test"):
        assert all(n >= 1 for n in a.counts(split).values()), split  # every class in every split
    assert a.layout.endswith("+generated-split") and a.split_generated and not discover(synthetic_data).split_generated


def _with_copies(src: Path, dest: Path, copies: int) -> tuple[Path, list[Path]]:
    """The data at src with `copies` byte-identical copies of one COVID image (as the public collections hold:
    one radiograph filed twice under different names)."""
    shutil.copytree(src, dest)
    original = sorted((dest / "COVID" / "images").glob("*.png"))[0]
    made = [original.with_name(f"copy_{i}.png") for i in range(copies)]
    for path in made:
        shutil.copyfile(original, path)
    return dest, [original, *made]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_generated_split_keeps_copies_of_one_image_in_one_split(synthetic_data, tmp_path, seed):
    """A random split puts copies of one image in train and in val, and val then scores an image the model
    trained on. Seven copies among 19 COVID images: a split that ignored them scattered them at every seed."""
    root, group = _with_copies(synthetic_data, tmp_path / "data", copies=6)
    idx = assign_splits(discover(root), seed=seed)
    where = {s.path: s.split for s in idx.samples}
    assert len({where[p] for p in group}) == 1, {p.name: where[p] for p in group}
    for split in ("train", "val", "test"):
        assert all(n >= 1 for n in idx.counts(split).values()), split  # still stratified
    assert duplicate_summary(idx)["across_splits"] == 0


def test_data_without_copies_splits_as_before(synthetic_data):
    """The copy-aware split is the plain stratified split where no file repeats: runs made before it keep
    their splits (and --resume its fingerprint)."""
    from sklearn.model_selection import train_test_split

    idx = discover(synthetic_data)
    labels = [s.label for s in idx.samples]
    rest, test = train_test_split(np.arange(len(labels)), test_size=0.15, stratify=labels, random_state=5)
    train, val = train_test_split(rest, test_size=0.15 / 0.85, stratify=[labels[i] for i in rest], random_state=5)
    split = assign_splits(idx, seed=5)
    for name, positions in (("train", train), ("val", val), ("test", test)):
        assert {split.samples[i].path for i in positions} == {s.path for s in split.split(name)}


def test_copies_across_splits_or_classes_are_counted_and_named(synthetic_data, tmp_path):
    """A split the user gives is kept, but a val image that is a train image, or one file under two classes,
    is said with an example of each."""
    root, group = _with_copies(synthetic_data, tmp_path / "data", copies=1)
    other = root / "Normal" / "images" / "same_as_covid.png"
    shutil.copyfile(group[0], other)
    rows = [{"path": str(p.relative_to(root)), "label": p.parts[len(root.parts)], "split": "train"}
            for p in sorted(root.rglob("*.png"))]
    for row in rows:
        row["split"] = "val" if row["path"].endswith("copy_0.png") else "train"
    idx = discover(_write_csv(root / "labels.csv", rows, ("path", "label", "split")))
    summary = duplicate_summary(idx)
    assert (summary["groups"], summary["extra_copies"]) == (1, 2)
    assert summary["across_splits"] == 1 and summary["conflicting_labels"] == 1
    across, conflicting = duplicate_warnings(summary)
    assert "COVID/images/copy_0.png (val)" in across and "keep each image in one split" in across
    assert "Normal/images/same_as_covid.png (Normal)" in conflicting and "(COVID)" in conflicting
    assert duplicate_warnings(duplicate_summary(discover(synthetic_data))) == []


def _retouched(original: Path, dest: Path) -> list[Path]:
    """The radiograph at `original` as collections re-file it: enlarged 2x and brightened by 8% (PNG), and
    enlarged 3x (bicubic) and saved as JPEG quality 80. Not byte-identical: only its picture is the same."""
    from PIL import Image

    gray = Image.open(original).convert("L")
    w, h = gray.size
    made = [dest / f"{original.stem}_retouched.png", dest / f"{original.stem}_reencoded.jpg"]
    gray.resize((2 * w, 2 * h), Image.BICUBIC).point(lambda v: min(255, int(v * 1.08))).save(made[0])
    gray.resize((3 * w, 3 * h), Image.BICUBIC).save(made[1], quality=80)
    return made


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_generated_split_keeps_lookalikes_of_one_radiograph_in_one_split(synthetic_data, tmp_path, seed):
    """A radiograph re-encoded, resized or brightened is one picture in three files: a split that only knew
    byte-identical copies put them in two splits at every seed here."""
    from train.data import copy_groups, lookalikes

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    images = root / "COVID" / "images"
    originals = sorted(images.glob("*.png"))[0], sorted(images.glob("*.png"))[3]
    groups = [[original, *_retouched(original, images)] for original in originals]  # two pictures, 3 files each
    idx = discover(root)
    pairs = lookalikes(idx.samples)
    found = {frozenset((idx.samples[i].path, idx.samples[j].path)) for i, j, _ in pairs}
    assert found == {frozenset((a, b)) for g in groups for a in g for b in g if a != b}, pairs
    assert max(d for _, _, d in pairs) <= 20
    split = assign_splits(idx, seed=seed)
    where = {s.path: s.split for s in split.samples}
    for group in groups:
        assert len({where[p] for p in group}) == 1, {p.name: where[p] for p in group}
    for name in ("train", "val", "test"):
        assert all(n >= 1 for n in split.counts(name).values()), name
    assert len(set(copy_groups(idx.samples))) == len(idx.samples) - 4
    assert duplicate_summary(split)["lookalike"]["across_splits"] == 0


def test_lookalikes_across_splits_or_classes_are_counted_and_named(synthetic_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    original = sorted((root / "COVID" / "images").glob("*.png"))[0]
    in_val, unused = _retouched(original, root / "COVID" / "images")
    unused.unlink()
    unused, in_normal = _retouched(original, root / "Normal" / "images")
    unused.unlink()
    rows = [{"path": str(p.relative_to(root)), "label": p.parts[len(root.parts)],
             "split": "val" if p == in_val else "train"} for p in sorted(root.rglob("*.*")) if p.suffix != ".csv"]
    summary = duplicate_summary(discover(_write_csv(root / "labels.csv", rows)))
    assert (summary["groups"], summary["lookalike"]["groups"], summary["lookalike"]["extra_copies"]) == (0, 1, 2)
    across, conflicting = duplicate_warnings(summary)
    assert "look like an image of another split" in across and f"{in_val.name} (val)" in across
    assert f"{in_normal.name} (Normal)" in conflicting and "(COVID)" in conflicting


def _with_patients(synthetic_data: Path, dest: Path, split=None) -> Path:
    """A labels CSV as NIH ChestX-ray14 names patients ('Patient ID'): two images per patient, one class each."""
    files = sorted(synthetic_data.rglob("*.png"))
    rows = [{"path": str(p), "label": p.parts[len(synthetic_data.parts)],
             "Patient ID": f"{p.parts[len(synthetic_data.parts)][:3]}-{i // 2}", "split": split(i) if split else ""}
            for i, p in enumerate(files)]
    return _write_csv(dest, rows, ("path", "label", "Patient ID", "split"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_generated_split_keeps_each_patients_images_in_one_split(synthetic_data, tmp_path, seed):
    """A patient's radiographs (follow-ups, two views) are one patient: an image split put the same patient in
    train and val at every seed, and val then scored patients the model had trained on."""
    from train.data import write_splits_csv

    idx = discover(_with_patients(synthetic_data, tmp_path / "labels.csv"))
    assert len({s.patient for s in idx.samples}) == 24 and idx.samples[0].patient == "COV-0"
    split = assign_splits(idx, seed=seed)
    by_patient: dict[str, set] = {}
    for s in split.samples:
        by_patient.setdefault(s.patient, set()).add(s.split)
    assert all(len(where) == 1 for where in by_patient.values()), by_patient
    for name in ("train", "val", "test"):
        assert all(n >= 1 for n in split.counts(name).values()), name
    assert duplicate_summary(split)["patients"] == {"patients": 24, "across_splits": 0, "examples_across_splits": []}
    write_splits_csv(split, tmp_path / "splits.csv")  # the run's split keeps the patients for later checks
    again = discover(tmp_path / "splits.csv")
    assert [(s.patient, s.split) for s in again.samples] == [(s.patient, s.split) for s in split.samples]


def test_a_given_split_with_a_patient_in_two_splits_is_named(synthetic_data, tmp_path, tiny_checkpoint):
    from train import evaluate

    csv_path = _with_patients(synthetic_data, tmp_path / "labels.csv", split=lambda i: "val" if i % 4 == 0 else "train")
    summary = duplicate_summary(discover(csv_path))
    assert summary["patients"]["across_splits"] == 12
    warning = next(w for w in duplicate_warnings(summary) if "patients" in w)
    assert warning.startswith("12 of 24 patients have images in two splits (patient COV-0: ")
    out = tmp_path / "report"
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(csv_path), "--split", "val",
                          "--out", str(out)]) == 0
    n_val = sum(1 for s in discover(csv_path).samples if s.split == "val")
    assert f"{n_val} of these {n_val} val images are of patients who also have images in the train split" in \
        (out / "report.md").read_text()


def test_lookalike_pairs_count_differing_bits_and_groups_chain():
    from train.lookalike import group_representatives, lookalike_pairs

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 32, dtype=np.uint8)
    flipped = base.copy()
    flipped[:2] ^= 0xFF  # 16 bits differ
    far = base ^ 0xFF  # 256 bits differ
    hashes = [base.tobytes(), None, flipped.tobytes(), far.tobytes()]
    assert lookalike_pairs(hashes) == [(0, 2, 16)]
    assert lookalike_pairs(hashes, max_bits=15) == []
    assert group_representatives(5, [(3, 4), (1, 3)]) == [0, 1, 2, 1, 1]



def test_lookalike_pairs_are_every_close_pair_across_blocks_and_between_two_sets(monkeypatch):
    """The pairs equal a count of differing bits over every pair, with blocks much smaller than the set (the
    block and triangle bookkeeping) and between two sets (val against train)."""
    import train.lookalike as la

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (60, 32), dtype=np.uint8)
    near = base[rng.integers(0, 60, 90)].copy()
    for row in near:  # 0 to 30 flipped bits: some within 20, some beyond
        for bit in rng.choice(256, rng.integers(0, 31), replace=False):
            row[bit // 8] ^= 1 << (bit % 8)
    hashes: list = [h.tobytes() for h in np.concatenate([base, near])]
    hashes[7] = None
    as_bits = {i: np.unpackbits(np.frombuffer(h, np.uint8)) for i, h in enumerate(hashes) if h is not None}

    def brute(rows, cols, triangle):
        return [(i, j, int((as_bits[i] != as_bits[j]).sum())) for i in rows for j in cols
                if i in as_bits and j in as_bits and (not triangle or i < j)
                and (as_bits[i] != as_bits[j]).sum() <= la.LOOKALIKE_BITS]

    monkeypatch.setattr(la, "BLOCK_CELLS", 7 * len(hashes))  # blocks of 7 rows
    la._close_pairs.cache_clear()
    expected = brute(range(150), range(150), True)
    assert len(expected) > 20 and la.lookalike_pairs(hashes) == expected
    between = la.lookalike_pairs(hashes[:60], against=hashes[60:])
    assert between and between == [(i, j - 60, d) for i, j, d in brute(range(60), range(60, 150), False)]

@pytest.mark.shared
def test_real_radiographs_retouched_are_found_and_cxr4_has_no_other_lookalikes(shared_data, tmp_path):
    """On cxr4 (whose card says near-duplicates were removed) no two radiographs are look-alikes; a real
    radiograph enlarged, brightened or saved as JPEG again is found."""
    from train.data import lookalikes

    idx = discover(shared_data)
    assert lookalikes(idx.samples) == []
    picked = idx.split("val")[::200]
    for s in picked:
        _retouched(s.path, tmp_path)
    copies = discover(_write_csv(tmp_path / "labels.csv", [
        {"path": str(p), "label": idx.class_names[s.label], "split": "val"}
        for s in picked for p in (s.path, *sorted(tmp_path.glob(f"{s.path.stem}_*")))]))
    found = lookalikes(copies.samples)
    assert len(found) == 3 * len(picked), found


def test_a_float_image_in_0_to_1_reads_as_its_8_bit_twin(tmp_path, tiny_spec):
    """Float TIFFs hold [0, 1] (skimage's convention); PIL's convert("L") turned them black."""
    from PIL import Image

    from train.spec import load_gray_image

    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "eight.png")
    as_float = np.asarray(load_gray_image(tmp_path / "float.tif", tiny_spec), dtype=int)
    as_eight = np.asarray(load_gray_image(tmp_path / "eight.png", tiny_spec), dtype=int)
    assert np.abs(as_float - as_eight).max() <= 1 and as_float.max() > 200


def test_images_that_8_bits_would_wash_out_are_named(tmp_path, caplog):
    """12-bit data in a 16-bit PNG (DICOM converted by hand) scaled as 16-bit keeps 17 gray levels of 256, and
    a float image above 255 is clipped white: check_images names them and says what to write instead. Full-range
    16-bit and 8-bit images are not named."""
    from PIL import Image

    ramp = np.linspace(0, 1, 48 * 48).reshape(48, 48)
    folders = {c: tmp_path / "data" / c for c in ("A", "B")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(folders["A"] / "twelve_bit.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(folders["A"] / "sixteen_bit.png")
    Image.fromarray((ramp * 4095).astype(np.float32)).save(folders["B"] / "float_4095.tif")
    Image.fromarray((ramp * 255).astype(np.uint8)).save(folders["B"] / "eight_bit.png")
    with caplog.at_level("WARNING"):
        idx = check_images(discover(tmp_path / "data"), progress=False)
    assert len(idx.samples) == 4 and sorted(Path(p).name for p, _ in idx.washed_out) == ["float_4095.tif",
                                                                                        "twelve_bit.png"]
    lost = dict((Path(p).name, why) for p, why in idx.washed_out)
    assert lost["twelve_bit.png"].startswith("16-bit image whose values stop at 4095") and "17 gray level" in lost[
        "twelve_bit.png"]
    assert "values up to 4095: above 255 is clipped white" in lost["float_4095.tif"]
    assert "2 of 4 images lose most of their gray levels" in caplog.text and "(value x 16)" in caplog.text


@pytest.mark.parametrize("orientation, stored_as", [(6, "ROTATE_90"), (3, "ROTATE_180"), (8, "ROTATE_270")])
def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation, stored_as):
    """A phone stores a photo of a film sideways with EXIF orientation 6; viewers and the Dart image package's
    JPEG decoder turn it upright, PIL does not. Training, verification and the TorchServe handler read it upright."""
    from PIL import Image

    from export.torchserve_handler import decode_image
    from train.spec import PreprocessSpec, load_gray_image

    spec = PreprocessSpec(input_size=48)
    yy, xx = np.mgrid[0:96, 0:64]
    Image.fromarray(((yy * 2 + (xx > 40) * 60) % 256).astype(np.uint8)).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.open(tmp_path / "upright.png").transpose(getattr(Image.Transpose, stored_as))
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    want = np.asarray(load_gray_image(tmp_path / "upright.png", spec), dtype=int)
    got = np.asarray(load_gray_image(tmp_path / "photo.jpg", spec), dtype=int)
    assert np.abs(got - want).max() <= 3  # JPEG at quality 95
    served = decode_image((tmp_path / "photo.jpg").read_bytes(), spec)[0] * 255
    assert np.abs(served - got).max() < 1e-3


def test_images_in_subfolders_of_a_class_are_read_and_masks_are_not(tmp_path):
    """A class kept in one subfolder per source or batch is read as torchvision's ImageFolder reads it (before:
    "class 'A' has no images; its folder .../A is empty"); the COVID-19 Radiography layout's masks/ beside
    images/ stays out, and so do hidden folders."""
    from PIL import Image

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)

    for name in ("A/source1/0.png", "A/source2/deep/1.png", "A/.cache/2.png", "B/0.png"):
        image(tmp_path / "plain" / name)
    idx = discover(tmp_path / "plain")
    assert idx.counts() == {"A": 2, "B": 1}
    assert [s.path.relative_to(tmp_path / "plain").as_posix() for s in idx.samples] == [
        "A/source1/0.png", "A/source2/deep/1.png", "B/0.png"]
    for name in ("A/images/0.png", "A/images/batch2/1.png", "A/masks/0.png", "B/images/0.png", "B/masks/0.png"):
        image(tmp_path / "covid" / name)
    idx = discover(tmp_path / "covid")
    assert idx.layout == "covid19-radiography" and idx.counts() == {"A": 2, "B": 1}
    assert not any("masks" in s.path.parts for s in idx.samples)


def test_split_folders_give_each_image_its_split(tmp_path):
    """`<split>/<Class>/` is how many data sets come (Kaggle's chest_xray: train/ val/ test/ with NORMAL/ and
    PNEUMONIA/): each image's split is its top folder, whatever the split folder's name and case. A model that
    read train/ val/ test/ as three classes would learn to tell the splits apart."""
    from PIL import Image

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)

    root = tmp_path / "chest_xray"
    for name in ("train/NORMAL/a.jpeg", "train/NORMAL/b.jpeg", "train/PNEUMONIA/c.jpeg", "Validation/NORMAL/d.jpeg",
                 "Validation/PNEUMONIA/e.jpeg", "test/PNEUMONIA/images/f.png", "test/NORMAL/g.png"):
        image(root / name)
    idx = discover(root)
    assert idx.layout == "split-folders" and idx.class_names == ("NORMAL", "PNEUMONIA") and idx.has_split
    assert {split: idx.counts(split) for split in ("train", "val", "test")} == {
        "train": {"NORMAL": 2, "PNEUMONIA": 1}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
        "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    (root / "COVID").mkdir()
    with pytest.raises(DataError, match=r"named as splits and \['COVID'\] are not"):
        discover(root)
    (root / "COVID").rmdir()
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"Validation/ and val/ are both the val split|val/ and Validation/ are both"):
        discover(root)


def test_a_csv_split_column_takes_the_names_data_sets_use(synthetic_data, tmp_path):
    rows = _rows(synthetic_data, with_split=True)
    for i, row in enumerate(rows):
        row["split"] = {"val": ["Validation", "valid", "VAL"][i % 3], "train": ["Train", "training"][i % 2]}[row["split"]]
    idx = discover(_write_csv(tmp_path / "named.csv", rows), data_root=synthetic_data)
    assert len(idx.split("val")) == 12 and len(idx.split("train")) == 36
    rows[0]["split"] = "holdout"
    with pytest.raises(DataError, match=r"split 'holdout' is not one of \('train', 'val', 'test'\) \(or training, "):
        discover(_write_csv(tmp_path / "bad.csv", rows), data_root=synthetic_data)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        discover(tmp_path / "nope")


def test_empty_class_named(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", per_class=2, size=32)
    for f in (root / "Normal" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="'Normal' has no images; its folder .*/Normal/images is empty"):
        discover(root)
    for i in range(3):  # X-rays as they leave the scanner: DICOM, which the toolkit does not read
        (root / "Normal" / "images" / f"{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(DataError, match=r"'Normal' has no images; its folder .* holds 3 \.dcm files, none of them "
                                        r"an image the toolkit reads \(.*\.png.*\) \(DICOM: convert to PNG"):
        discover(root)


def test_unknown_csv_label_named(synthetic_data, tmp_path):
    rows = _rows(synthetic_data, True)
    rows[5]["label"] = "Tuberculosis"
    csv_path = _write_csv(tmp_path / "list.csv", rows)
    with pytest.raises(DataError, match=r"line 7: unknown label 'Tuberculosis'"):
        discover(csv_path, class_names=DEFAULT_CLASSES, data_root=synthetic_data)



def test_csv_rows_without_a_label_or_path_are_named_not_made_a_class(synthetic_data, tmp_path):
    """A spreadsheet with images not labelled yet: the blank labels became a class named '' that the model
    learned as a fifth output. Line numbers count the CSV's empty rows too."""
    rows = _rows(synthetic_data, True)
    for r in rows[3:6]:
        r["label"] = ""
    csv_path = _write_csv(tmp_path / "list.csv", rows)
    with pytest.raises(DataError, match=r"list.csv line 5 \(and 2 more rows\): no label; give every row a label, "
                                        r"or leave unlabelled images out of the CSV"):
        discover(csv_path, data_root=synthetic_data)
    rows = _rows(synthetic_data, True)
    rows[2]["path"] = ""
    text = _write_csv(tmp_path / "paths.csv", rows).read_text().splitlines()
    (tmp_path / "paths.csv").write_text("\n".join([text[0], "", *text[1:]]) + "\n")  # an empty line 2
    with pytest.raises(DataError, match=r"paths.csv line 5: no path"):
        discover(tmp_path / "paths.csv", data_root=synthetic_data)
    rows[2]["path"], rows[4]["label"] = _rows(synthetic_data, True)[2]["path"], "Tuberculosis"
    text = _write_csv(tmp_path / "labels.csv", rows).read_text().splitlines()
    (tmp_path / "labels.csv").write_text("\n".join([text[0], "", *text[1:]]) + "\n")
    with pytest.raises(DataError, match=r"line 7: unknown label 'Tuberculosis'"):
        discover(tmp_path / "labels.csv", class_names=DEFAULT_CLASSES, data_root=synthetic_data)


def test_a_runs_splits_csv_keeps_the_data_s_source_patient_and_cohort(synthetic_data, tmp_path):
    """Explaining a run on the data it trained on reads the run's splits.csv, which kept only path, label and split:
    the source and cohort audits said the data named none. A spreadsheet's CSV (byte-order mark, ';') gives the
    cohorts as it gives the labels (the audit read it with plain csv and raised KeyError: 'path')."""
    from train.data import assign_splits, write_splits_csv

    rows = _rows(synthetic_data, False)
    lines = ["path;label;Source;Cohort;Patient_ID"] + [f"{r['path']};{r['label']};site{i % 3};c{i % 2};p{i}"
                                                       for i, r in enumerate(rows)]
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    idx = discover(tmp_path / "labels.csv", data_root=synthetic_data)
    assert [(s.source, s.cohort, s.patient) for s in idx.samples[:2]] == [("site0", "c0", "p0"), ("site1", "c1", "p1")]
    write_splits_csv(assign_splits(idx), tmp_path / "splits.csv")
    again = {s.path: s for s in discover(tmp_path / "splits.csv").samples}
    assert all((again[s.path].source, again[s.path].cohort, again[s.path].patient) == (s.source, s.cohort, s.patient)
               for s in idx.samples)

def _corrupt(root: Path) -> tuple[Path, Path]:
    """One garbage file and one truncated PNG (a real image cut in half)."""
    garbage = root / "COVID" / "images" / "synthetic-garbage.png"
    garbage.write_bytes(b"this is not an image")
    src = next((root / "Normal" / "images").iterdir())
    truncated = root / "Normal" / "images" / "synthetic-truncated.png"
    data = src.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return garbage, truncated


def test_unreadable_and_truncated_images(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", per_class=3, size=32)
    garbage, truncated = _corrupt(root)
    with pytest.raises(DataError, match=r"synthetic-garbage\.png: unreadable image.*--skip-bad"):
        check_images(discover(root), progress=False)
    garbage.unlink()
    with pytest.raises(DataError, match=r"synthetic-truncated\.png: unreadable image"):
        check_images(discover(root), progress=False)


def test_skip_bad_reports_files(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", per_class=3, size=32)
    garbage, truncated = _corrupt(root)
    idx = check_images(discover(root), skip_bad=True, progress=False)
    assert sorted(p for p, _ in idx.skipped) == sorted([str(garbage), str(truncated)])
    assert len(idx.samples) == 12


def test_load_batch_is_unit_range(synthetic_data, tiny_spec):
    idx = discover(synthetic_data)
    x = load_batch(idx.samples[:5], tiny_spec)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x[:, 0], x[:, 2])  # grayscale repeated into 3 channels


def test_split_without_test_part_and_bad_fractions(synthetic_data):
    idx = assign_splits(discover(synthetic_data), seed=0, val_frac=0.25, test_frac=0.0)
    assert not idx.split("test") and len(idx.split("val")) == 12
    with pytest.raises(DataError, match="--val-frac 0.6 and --test-frac 0.5"):
        assign_splits(discover(synthetic_data), val_frac=0.6, test_frac=0.5)


def test_an_unreadable_image_is_named_by_every_reader(tmp_path, synthetic_index, ckpt):
    """Every stage decodes through train.spec: a cut-off file is one ToolkitError naming it, not a PIL traceback."""
    from train.errors import ToolkitError
    from train.spec import ImageReadError

    sample = synthetic_index.samples[0]
    bad = tmp_path / sample.path.name
    bad.write_bytes(sample.path.read_bytes()[:40])
    with pytest.raises(ImageReadError, match="unreadable image") as err:
        load_batch([replace(sample, path=bad)], ckpt.spec)
    assert str(bad) in str(err.value) and isinstance(err.value, ToolkitError)
    idx = replace(synthetic_index, samples=[replace(sample, path=bad), *synthetic_index.samples[1:]])
    with pytest.raises(DataError, match="--skip-bad"):
        check_images(idx, progress=False)
    assert [p for p, _ in check_images(idx, skip_bad=True, progress=False).skipped] == [str(bad)]


def test_an_empty_split_names_the_splits_there_are(synthetic_index):
    """One wording for every command's --split (benchmarks, quantize, evaluate, explain)."""
    halves = [replace(s, split="train" if i % 2 else "val") for i, s in enumerate(synthetic_index.samples)]
    idx = replace(synthetic_index, samples=halves)
    assert idx.require_split("val") == idx.split("val") and idx.require_split("val")
    with pytest.raises(DataError, match=r"--split test: .* pick --split from \['train', 'val'\]"):
        idx.require_split("test")
