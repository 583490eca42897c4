"""What the bundle proves to an app: test vectors (PNG, the float input as raw bytes, the logits each bundled
model gives) and the bundled models' accuracy on labelled images, each run from the bundle in its runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.common import FLOAT_ATOL
from export.manifest import ArtifactEntry
from export.runners import get_runner
from export.registry import variant
from train.data import Sample, load_batch, seeded_subset
from train.metrics import classification_metrics, compare_logits
from train.spec import PreprocessSpec, load_unit_image, to_gray8, upright



def run_entry(entry: ArtifactEntry, path: Path, x: np.ndarray) -> np.ndarray:
    return get_runner(entry.runtime, engine=entry.engine).load(path).run(x)


ENLARGE = 4.5  # a scale that is not a whole number: a resize that only samples pixels shows at once


def _vector_images(spec: PreprocessSpec, samples: Sequence[Sample] | None, n: int, tmp: Path) -> list[tuple[Path, str]]:
    if samples:
        chosen = [(s.path, f"{spec.class_names[s.label]} image from --data") for s in seeded_subset(samples, n)]
        return _with_a_resize_to_check(chosen, spec, tmp)
    from train.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp, per_class=1, size=spec.input_size * 2, seed=7, classes=spec.class_names,
                                  layout="plain")
    return [(p, "SYNTHETIC generated image (no images recorded)") for p in sorted(root.rglob("*.png"))[:n]]


def _with_a_resize_to_check(chosen: list[tuple[Path, str]], spec: PreprocessSpec,
                            tmp: Path) -> list[tuple[Path, str]]:
    """Images already at the model's input size (cxr4's are 224 px) leave the app's resize unchecked, though
    photos arrive at 1000 px and more, and resizers differ there most (a resize that samples 4 pixels is not
    PIL's antialiasing bilinear). Then the last vector is its image enlarged (bicubic) by ENLARGE, so the
    app's preprocessing of that PNG must shrink it as the toolkit does."""
    from PIL import Image

    def larger(path: Path) -> bool:
        with Image.open(path) as img:
            return min(img.size) > spec.input_size
    if not chosen or any(larger(p) for p, _ in chosen):
        return chosen
    path, source = chosen[-1]
    size = round(spec.input_size * ENLARGE)
    with Image.open(path) as img:
        img.load()
        big = to_gray8(upright(img)).resize((size, size), Image.Resampling.BICUBIC)
    big.save(tmp / "enlarged.png")
    return [*chosen[:-1], (tmp / "enlarged.png", f"{source}, enlarged to {size} px (bicubic) so the app's resize "
                                                 f"is checked: the images of --data are at the input size already")]


def _write_inputs(out: Path, spec: PreprocessSpec, images: list[tuple[Path, str]],
                  nhwc: bool) -> tuple[list[dict], np.ndarray]:
    from PIL import Image

    vectors, batch = [], []
    for i, (src, source) in enumerate(images):
        name = f"vector_{i:02d}"
        with Image.open(src) as img:
            img.load()
            img = upright(img)  # the PNG keeps no EXIF orientation: store the image as the model sees it
            (img if img.mode in ("L", "RGB", "RGBA", "I;16") else to_gray8(img)).save(out / f"{name}.png")
        x = load_unit_image(out / f"{name}.png", spec)[None]
        (out / f"{name}.bin").write_bytes(x.astype("<f4").tobytes())
        batch.append(x[0])
        vectors.append({"name": name, "png": f"test_vectors/{name}.png", "input": f"test_vectors/{name}.bin",
                        "shape": list(x.shape), "dtype": "float32", "byte_order": "little", "source": source})
        if nhwc:  # the same numbers in the order NHWC models (.tflite) take them
            (out / f"{name}.nhwc.bin").write_bytes(x.transpose(0, 2, 3, 1).astype("<f4").tobytes())
            vectors[-1]["input_nhwc"] = f"test_vectors/{name}.nhwc.bin"
    return vectors, np.stack(batch)


def write_test_vectors(stage: Path, spec: PreprocessSpec, models: list[ArtifactEntry],
                       samples: Sequence[Sample] | None, n: int, reference: Any = None) -> dict[str, Any]:
    """PNG inputs, their outside-the-model preprocessing as little-endian float32, expected logits per
    bundled model (and of the float PyTorch model when its checkpoint is at hand: `reference`)."""
    from train.atomic import write_json

    out = stage / "test_vectors"
    out.mkdir()
    with tempfile.TemporaryDirectory(prefix="cxr-vectors-") as tmp:
        nhwc = any((e.details.get("input_layout") or variant(e.name).layout) == "NHWC" for e in models)
        vectors, x = _write_inputs(out, spec, _vector_images(spec, samples, n, Path(tmp)), nhwc)
    expected: dict[str, Any] = {}
    if reference is not None:
        expected["reference (PyTorch eager float)"] = get_runner("torch-eager").use_module(reference).run(x)
    for e in models:
        file = variant(e.name).file
        try:
            expected[file] = run_entry(e, stage / file, x)
        except Exception as err:  # e.g. no ExecuTorch runtime here: say so instead of failing the bundle
            expected[file] = f"not computed: {type(err).__name__}: {err}"
    logits = {k: (v if isinstance(v, str) else {vec["name"]: [float(z) for z in row] for vec, row in zip(vectors, v)})
              for k, v in expected.items()}
    write_json(out / "expected_logits.json", {"classes": list(spec.class_names), "logits": logits})
    tolerance: dict[str, Any] = {variant(e.name).file: FLOAT_ATOL if not variant(e.name).is_int8 else
                                 "same engine: 1e-3; other engines may differ" for e in models}
    tolerance["app decoding"] = "compare your float input with the .bin first (max abs diff <= 1/255)"
    return {"expected_logits": "test_vectors/expected_logits.json", "vectors": vectors, "tolerance": tolerance}


def _score(runner: Any, entry: ArtifactEntry, spec: PreprocessSpec, samples: Sequence[Sample], y: np.ndarray,
           batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    from tqdm import tqdm

    outs = [runner.run(load_batch(samples[i:i + batch_size], spec)) for i in
            tqdm(range(0, len(samples), batch_size), desc=f"evaluating {entry.name}", unit="batch", leave=False)]
    logits = np.concatenate(outs)
    m = classification_metrics(y, logits, spec.class_names)
    return logits, {"model": variant(entry.name).file, "engine": entry.engine, "accuracy": m["accuracy"],
                    "macro_f1": m["macro_f1"], "per_class_recall": {c: d["recall"] for c, d in m["per_class"].items()}}


def evaluate_models(stage: Path, spec: PreprocessSpec, models: list[ArtifactEntry], samples: Sequence[Sample],
                    batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall of the primary model's float and int8 files (the first bundled
    runtime: the ones the app guide starts with), run from the bundle in their runtime."""
    primary = models[0].runtime
    y = np.array([s.label for s in samples])
    result: dict[str, Any] = {"n_images": len(samples), "note": f"computed on the bundled {primary} files"}
    logits: dict[str, np.ndarray] = {}
    for e in (m for m in models if m.runtime == primary):
        runner = get_runner(e.runtime, engine=e.engine).load(stage / variant(e.name).file)
        key = "int8" if variant(e.name).is_int8 else "float"
        if key not in result:
            logits[key], result[key] = _score(runner, e, spec, samples, y, batch_size)
    if "int8" in logits:
        result["int8_vs_float"] = compare_logits(logits["float"], logits["int8"])
    return result
