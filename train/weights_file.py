"""Reading weights from a .pt file in any layout the toolkit accepts, with weights_only.

Accepted layouts:
  * the toolkit's own checkpoint (`format == FORMAT`), written by `python -m train` or `python -m train.convert`;
  * a plain torchvision ResNet-18 state dict (`conv1.weight`, ..., `fc.weight`);
  * the seeds' notebook style `{'model_state_dict': {'resnet18.conv1.weight': ...}}`;
  * either under a wrapper's prefix (DataParallel/DDP `module.`, torch.compile `_orig_mod.`, a module attribute);
  * a network trained on one gray channel (`conv1` with 1 input channel), widened by `widen_gray_stem`.
Both `train.model` (--weights PATH) and `train.checkpoint` read files this way, so it lives below both.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from train.errors import ToolkitError

FORMAT = "cxr-toolkit-checkpoint"
STEM_KEYS = ("conv1.weight", "bn1.weight")  # where a ResNet's state dict starts; its head is under "fc."


class CheckpointError(ToolkitError, ValueError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names the file."""


def read_raw(path: str | Path) -> Any:
    """The file's contents as plain data; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --checkpoint with a .pt file "
                              f"written by `python -m train` or a ResNet-18 state dict")
    exported = EXPORTED_MODELS.get(path.suffix.lower())
    if exported:
        raise CheckpointError(f"{path} is {exported}, an exported model, not weights: pass the .pt weights it was "
                              f"exported from (`python -m export.inspect {path}` names the checkpoint of a file "
                              f"this toolkit exported)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pt file inside it")
    if _is_torchscript(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is a TorchScript archive (torch.jit.save), which holds the "
            f"model's code as well as its weights, and the toolkit reads weights only. Save the weights where "
            f"the model is defined, torch.save(model.state_dict(), 'weights.pt'), or, from a file you trust, "
            f"torch.save(torch.jit.load('{path}').state_dict(), 'weights.pt'), and pass that file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from err


EXPORTED_MODELS = {".onnx": "an ONNX model", ".ort": "an ONNX Runtime Mobile model", ".tflite": "a LiteRT model",
                   ".pte": "an ExecuTorch program", ".ptl": "a TorchScript Lite model",
                   ".mlpackage": "a CoreML package", ".mlmodel": "a CoreML model", ".mar": "a TorchServe archive"}


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save writes a zip like torch.save's, with the model's code beside its tensors."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(("/constants.pkl", "/bytecode.pkl")) or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """Why torch.load refused a file, without the advice torch gives around it."""
    if isinstance(err, pickle.UnpicklingError):
        reason = _unpickler_reason(err)
        if "GLOBAL" in reason:  # e.g. torch.save(model): pickled Python objects
            return CheckpointError(
                f"cannot read checkpoint {path}: it holds pickled Python objects ({reason[:200]}), and the "
                f"toolkit loads weights only (torch.load with weights_only=True). Save the weights instead, "
                f"torch.save(model.state_dict(), PATH), and pass that file.")
        return CheckpointError(f"cannot read checkpoint {path}: not a file torch.save wrote ({reason[:200]}). "
                               f"{_EXPECTED}")
    return CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:300]}. {_EXPECTED}")


_EXPECTED = ("It must be a file saved with torch.save holding only tensors and plain data "
             "(the toolkit never unpickles arbitrary objects).")


def _unpickler_reason(err: Exception) -> str:
    """What torch's weights-only unpickler objected to, without torch's advice around it (which suggests
    loading the file with weights_only=False: the one thing the toolkit never does with a user's file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).replace("WeightsUnpickler error:", "\n")
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [ln.strip() for ln in text.splitlines()]
    reasons = [ln for ln in lines if ln and not ln.startswith(advice) and "weights_only" not in ln]
    reason = reasons[0] if reasons else "torch's weights-only unpickler refused it"
    return re.split(r" was not an allowed global| Please use", reason)[0].strip()


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """The network's weights from under the prefixes wrappers put in front of them: DataParallel's and DDP's
    `module.`, torch.compile's `_orig_mod.` (both: `module._orig_mod.`), a notebook's or a Lightning module's
    attribute (`resnet18.`, `model.`, `net.`, ...). The prefix is whatever stands before the stem's
    `conv1.weight` where `bn1.weight` and a head under `fc.` (one Linear, or a Sequential) follow it too; keys
    outside it (a loss's weights) are left out, and the strict load after this names anything missing."""
    if STEM_KEYS[0] in state:
        return state
    candidates = [k[: -len(STEM_KEYS[0])] for k in state if k.endswith("." + STEM_KEYS[0])]
    prefixes = sorted((p for p in candidates if all(p + key in state for key in STEM_KEYS)
                       and any(k.startswith(p + "fc.") for k in state)), key=len)
    if not prefixes:
        return state
    return {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])}


def _one_linear_head(state: dict[str, Any]) -> dict[str, Any]:
    """`fc = nn.Sequential(nn.Dropout(p), nn.Linear(512, classes))`, the head many notebooks train, is one Linear
    layer at inference: its `fc.<i>.weight/bias` become `fc.weight/bias`. A head with more layers holding weights
    (an MLP, a BatchNorm) is kept as it is, and the check of the head then names its layers."""
    if "fc.weight" in state:
        return state
    head = {k: v for k, v in state.items() if k.startswith("fc.")}
    linear = [k for k, v in head.items() if k.endswith(".weight") and getattr(v, "ndim", 0) == 2]
    if len(linear) != 1 or set(head) - {linear[0], linear[0][: -len("weight")] + "bias"}:
        return state
    index = linear[0][len("fc."): -len(".weight")]
    renamed = {f"fc.{index}.weight": "fc.weight", f"fc.{index}.bias": "fc.bias"}
    return {renamed.get(k, k): v for k, v in state.items()}


def widen_gray_stem(state: dict[str, Any]) -> dict[str, Any]:
    """A ResNet-18 trained on one gray channel (`conv1 = nn.Conv2d(1, 64, ...)`, common for X-rays) as the
    toolkit's 3-channel one: its conv1 weights split in three over the three identical gray channels the
    toolkit feeds. The same function wherever the three channels are normalized alike (`train.checkpoint`
    checks that for an export); a fair start for fine-tuning otherwise. Other state dicts come back as they are."""
    w = state.get(STEM_KEYS[0])
    if not isinstance(w, torch.Tensor) or w.ndim != 4 or w.shape[1] != 1:
        return state
    return {**state, STEM_KEYS[0]: (w / 3).expand(-1, 3, -1, -1).contiguous()}


def as_state_dict(raw: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Return (state dict, source format) from any accepted layout."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(raw).__name__}")
    if raw.get("format") == FORMAT:
        return raw["state_dict"], FORMAT
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(raw.get(key), dict):
            return _one_linear_head(_strip_prefix(raw[key])), "notebook"
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        stripped = _one_linear_head(_strip_prefix(raw))
        return stripped, "torchvision_state_dict" if stripped is raw else "notebook"
    raise CheckpointError(
        f"{path}: not a toolkit checkpoint, a torchvision state dict, or a notebook-style "
        f"{{'model_state_dict': ...}} dict (top-level keys: {sorted(raw)[:8]})"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Just the weights, from any accepted layout."""
    return as_state_dict(read_raw(path), Path(path))[0]
