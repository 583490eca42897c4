"""The metadata every artifact carries inside itself: one dict, built once per file from the checkpoint and
its spec, embedded where each format keeps such things and recorded in the manifest entry beside it.

A model file copied out of its folder (into an app, a model registry, a bug report) still says what it is:
its classes in output order, the input it takes, where normalization happens, and where it came from.
Each format module embeds it (`METADATA_FILE`, `METADATA_KEY`) and reads it back (`read_metadata`).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
from typing import Any

from export.registry import format_of, variant
from train.checkpoint import Checkpoint

METADATA_KEY = "cxr_metadata"          # ONNX metadata_props, CoreML user metadata, LiteRT metadata name
METADATA_FILE = "cxr_metadata.json"    # TorchScript / .ptl extra file, TorchServe archive file
RESEARCH_NOTICE = ("RESEARCH SOFTWARE, NOT A MEDICAL DEVICE. This model has not been validated for clinical use "
                   "and must not be used to diagnose, treat or triage patients. Its training data confounds "
                   "diagnosis with image source, so its accuracy on other images is unknown.")
# what a later reader must find unchanged (the creation time and tool version may legitimately differ)
COMPARED = ("artifact", "format", "precision", "classes", "input", "normalization_inside_model",
            "source_checkpoint_sha256")


def toolkit_version() -> str:
    try:
        return importlib.metadata.version("cxr-mobile-export")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def embedded_metadata(ckpt: Checkpoint, name: str, layout: str | None = None) -> dict[str, Any]:
    """The dict embedded in entry `name`'s file (`layout` when an option changed the registered one)."""
    spec, v = ckpt.spec, variant(name)
    inputs, outputs = io_contract(spec, name, layout)
    return {
        "toolkit": "cxr-mobile-export", "toolkit_version": toolkit_version(),
        "artifact": name, "format": format_of(name).name, "precision": v.precision,
        "classes": list(spec.class_names),
        "input": inputs,
        "normalization_inside_model": {"mean": list(spec.mean), "std": list(spec.std),
                                       "contrast_stretch": spec.contrast_stretch},
        "outputs": outputs,
        "source_checkpoint_sha256": ckpt.sha256,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notice": RESEARCH_NOTICE,
    }


def io_contract(spec: Any, name: str, layout: str | None = None) -> tuple[dict[str, Any], str]:
    """What entry `name`'s file takes and returns. Most take the float tensor of the spec's preprocessing and
    return logits; CoreML takes an image and adds a classifier, TorchServe takes encoded image bytes and answers
    JSON, and the int8 .tflite returns int8 logits."""
    v = variant(name)
    layout = (layout or v.layout).upper()
    n, c, h, w = spec.input_shape
    n = "batch" if v.batch == "dynamic" else int(v.batch)  # a file that takes any batch says so
    tensor = {"shape": [n, h, w, c] if layout == "NHWC" else [n, c, h, w], "layout": layout, "dtype": "float32",
              "value_range": [0.0, 1.0], "resize": spec.resize, "size": spec.input_size,
              "colour": "grayscale radiograph repeated in 3 channels"}
    logits = "logits in the order of classes; softmax for probabilities"
    if v.runtime == "coreml":
        return ({**tensor, "layout": "image", "dtype": "RGB image (CVPixelBuffer, 8 bits per channel)",
                 "value_range": [0, 255], "colour": "any RGB image; scaled by 1/255 and made gray inside the model"},
                "classLabel (the most probable class), classLabel_probs (class -> softmax probability) and "
                "logits (float32, in the order of classes)")
    if v.runtime == "torchserve":
        return ({"shape": "one image per request", "layout": "encoded image",
                 "dtype": "PNG or JPEG bytes (the request body, or multipart field 'data' or 'body')",
                 "value_range": None, "resize": spec.resize, "size": spec.input_size,
                 "colour": "grayscale or colour; the handler decodes, makes gray and resizes as the spec says"},
                'JSON {"label": the most probable class, "probabilities": {class: softmax probability}}')
    if v.runtime == "litert" and v.is_int8:
        return tensor, ("int8 logits in the order of classes: logit = scale * (q - zero_point) with the output "
                        "tensor's quantization parameters; dequantize before softmax (the top class needs no "
                        "dequantizing)")
    return tensor, logits


def to_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)


def from_json(text: str | bytes | None) -> dict[str, Any] | None:
    if text is None:
        return None
    meta = json.loads(text)
    return meta if isinstance(meta, dict) else None


def mismatches(embedded: dict[str, Any] | None, recorded: dict[str, Any] | None) -> list[str]:
    """The fields where a file's embedded metadata and its manifest record disagree."""
    if embedded is None or recorded is None:
        return [] if embedded is recorded else ["metadata present in only one of the file and the manifest"]
    return [k for k in COMPARED if embedded.get(k) != recorded.get(k)]
