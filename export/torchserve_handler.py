"""TorchServe handler for the chest X-ray classifier, shipped inside `cxr_resnet18.mar`.

Runs inside a TorchServe worker where the toolkit is not installed, so it imports only what the archive
carries: `model.pt` (TorchScript DeployModel, normalization inside), `spec.json`, and `cxr_spec.py` (a
byte-for-byte copy of `train/spec.py`, so decoding, grayscale and resize are the checkpoint's own code) with
`cxr_errors.py` (the copy of `train/errors.py` it imports).

Per request: PNG/JPEG bytes (raw body or multipart field 'data'/'body', grayscale or colour) ->
{"label": top class, "probabilities": {class: p, ...}}. A request whose bytes cannot be decoded gets
HTTP 400 with {"error": ..., "status": 400}; the other requests of the same batch are still answered.
TorchServe requires exactly one class in this module, so helpers are plain functions.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from typing import Any

import numpy as np
import torch

try:  # inside the archive
    import cxr_spec as spec_lib
except ModuleNotFoundError as err:  # imported from the toolkit (tests); a broken archive copy still fails
    if err.name != "cxr_spec":
        raise
    from train import spec as spec_lib

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
SPEC_FILE = "spec.json"
INPUT_FIELDS = ("data", "body")
BAD_REQUEST = 400
IMAGE_FORMATS = ("PNG", "JPEG")


def request_bytes(request: Any) -> bytes:
    """The image bytes of one TorchServe request (raw body, multipart field, or base64 text)."""
    if isinstance(request, dict):
        payload = next((request[k] for k in INPUT_FIELDS if request.get(k) is not None), None)
        if payload is None:  # some clients name the multipart field differently; take the only one
            values = [v for v in request.values() if isinstance(v, (bytes, bytearray))]
            payload = values[0] if len(values) == 1 else None
    else:
        payload = request
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            return b""
    return b""


def decode_image(data: bytes, spec: Any) -> np.ndarray:
    """Bytes -> float32 (3, H, W) in [0, 1], exactly as `train.spec.load_unit_image` does for files."""
    from PIL import Image

    if not data:
        raise ValueError("no image bytes in the request; send a PNG or JPEG as the raw body "
                         "(curl -T image.png, or Content-Type: application/octet-stream) or as the "
                         "multipart field 'data' (curl -F data=@image.png)")
    try:  # only the PNG and JPEG decoders ever see request bytes
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception as err:  # UnidentifiedImageError's message holds a useless object repr
        raise ValueError(f"not a PNG or JPEG image ({len(data)} bytes)") from err
    with img:
        img.load()
        return spec_lib.gray_to_unit_array(spec_lib.to_gray_resized(img, spec))


def error_body(message: str) -> dict[str, Any]:
    return {"error": message, "status": BAD_REQUEST}


class CxrHandler:
    """Decode -> the spec's preprocessing -> TorchScript model -> softmax, one batch at a time."""

    def __init__(self) -> None:
        self.model: Any = None
        self.spec: Any = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """TorchServe entry: load from the unpacked archive folder; `handler.threads` in model-config.yaml."""
        props = context.system_properties
        options = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        self.load(props.get("model_dir"), threads=options.get("threads"))

    def load(self, model_dir: str | os.PathLike, threads: int | None = None) -> "CxrHandler":
        if threads:
            torch.set_num_threads(int(threads))
        with open(os.path.join(model_dir, SPEC_FILE), encoding="utf-8") as fh:
            self.spec = spec_lib.PreprocessSpec.from_dict(json.load(fh))
        self.model = torch.jit.load(os.path.join(model_dir, MODEL_FILE), map_location="cpu").eval()
        self.initialized = True
        log.info("cxr handler ready: %s; classes %s", self.spec.describe(), list(self.spec.class_names))
        return self

    def infer(self, payloads: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
        """(HTTP status, JSON body) per payload; bad payloads never fail the others."""
        results: list[tuple[int, dict[str, Any]] | None] = [None] * len(payloads)
        arrays, index = [], []
        for i, data in enumerate(payloads):
            try:
                arrays.append(decode_image(data, self.spec))
                index.append(i)
            except Exception as err:  # PIL raises many types for corrupt input
                results[i] = (BAD_REQUEST, error_body(f"cannot decode the image: {err}"))
                log.info("request %d rejected: %s", i, err)
        if arrays:
            # optimized_execution(False): TorchServe batches vary in size, and the profiling executor
            # would re-profile (hundreds of ms) for every new batch shape it sees.
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                probs = torch.softmax(self.model(torch.from_numpy(np.stack(arrays))), dim=1).tolist()
            names = self.spec.class_names
            for i, p in zip(index, probs):
                top = max(range(len(p)), key=p.__getitem__)
                results[i] = (200, {"label": names[top], "probabilities": dict(zip(names, p))})
        return results  # type: ignore[return-value]

    def handle(self, data: list[Any] | None, context: Any) -> list[dict[str, Any]] | None:
        if data is None:  # TorchServe's load-time call for function entry points; harmless here
            return None
        results = self.infer([request_bytes(r) for r in data])
        for i, (status, body) in enumerate(results):
            if status != 200:
                context.set_response_status(code=status, phrase="Bad Request", idx=i)
        return [body for _, body in results]
