"""The checkpoint format: one dict that rebuilds the model with its preprocessing, read with weights_only.

Every stage loads through `load_checkpoint`, which accepts the layouts `train.weights_file` reads
(toolkit checkpoint, torchvision state dict, notebook style). Foreign formats carry no preprocessing,
so the caller states it (defaults: the cxr4 spec).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.atomic import atomic_path, sha256_file
from train.model import DeployModel, WeightsError, build_network
from train.spec import PreprocessSpec, SpecError
from train.weights_file import FORMAT, CheckpointError, as_state_dict, read_raw, widen_gray_stem

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint. `source_format` says which of the accepted formats it came from."""

    path: Path | None
    state_dict: dict[str, torch.Tensor]
    spec: PreprocessSpec
    arch: str = "resnet18"
    arch_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT
    sha256: str | None = None

    def build_network(self) -> torch.nn.Module:
        """The network with these weights, in eval mode."""
        try:
            net = build_network(self.arch, num_classes=self.spec.num_classes, **self.arch_args)
        except WeightsError as err:  # the arch comes from the file: say which file
            raise WeightsError(f"{self.path}: {err}") from err
        net.load_state_dict(self.state_dict)
        return net.eval()

    def build_deploy_model(self) -> torch.nn.Module:
        """Preprocess + network: the float reference every export is compared with."""
        return DeployModel(self.build_network(), self.spec).eval()


def make_checkpoint_dict(
    state_dict: dict[str, torch.Tensor],
    spec: PreprocessSpec,
    *,
    arch: str = "resnet18",
    arch_args: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    split_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The on-disk dict. Only tensors, numbers, strings, lists and dicts, so weights_only can read it."""
    d: dict[str, Any] = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "arch": arch,
        "arch_args": dict(arch_args or {}),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "spec": spec.to_dict(),
        "train_config": dict(train_config or {}),
        "metrics": dict(metrics or {}),
        "history": list(history or []),
        "split_fingerprint": split_fingerprint,
        "torch_version": str(torch.__version__),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    d.update(extra or {})
    return d


def save_checkpoint(d: dict[str, Any], path: str | Path) -> Path:
    """Atomic save: a crash mid-write never leaves a truncated checkpoint under the real name."""
    with atomic_path(path) as tmp:
        torch.save(d, tmp)
    return Path(path)


def _check_head(state: dict[str, torch.Tensor], spec: PreprocessSpec, path: Path) -> None:
    head = sorted(k for k in state if k.startswith("fc.") and k.endswith(".weight"))
    if "fc.weight" not in state and "conv1.weight" in state and head:
        raise CheckpointError(
            f"{path}: the head `fc` has {len(head)} layers with weights ({', '.join(head)}); the toolkit's "
            f"ResNet-18 ends in one Linear layer, torchvision's `fc = nn.Linear(512, classes)` (a Dropout "
            f"before it is fine). Train with that head, or export the model yourself")
    if "fc.weight" not in state or "conv1.weight" not in state:
        raise CheckpointError(f"{path}: no ResNet-18 weights found (no conv1.weight / fc.weight keys)")
    n_out = state["fc.weight"].shape[0]
    if n_out != spec.num_classes:
        raise CheckpointError(
            f"{path}: the model has {n_out} outputs but there are {spec.num_classes} class names "
            f"{list(spec.class_names)}; convert it once with its {n_out} class names in output order, "
            f"`python -m train.convert --weights {path} --out runs/imported/best.pt --classes NAME ...` (and "
            f"--size/--mean/--std as its training used), and pass that checkpoint"
        )


def _gray_stem_as_rgb(state: dict[str, torch.Tensor], spec: PreprocessSpec, path: Path) -> dict[str, torch.Tensor]:
    """A network trained on one gray channel computes the same function in the toolkit's 3-channel form only
    when the three channels are normalized alike, with the one mean and std its training used."""
    widened = widen_gray_stem(state)
    if widened is not state:
        if len(set(spec.mean)) != 1 or len(set(spec.std)) != 1:
            raise CheckpointError(
                f"{path}: conv1 reads 1 channel, so this network was trained on gray images normalized with one "
                f"mean and one std, and the preprocessing stated for it has one per RGB channel "
                f"(mean {list(spec.mean)}, std {list(spec.std)}). Convert it once with the values its training "
                f"used, e.g. `python -m train.convert --weights {path} --out runs/imported/best.pt --mean 0.5 "
                f"--std 0.5`, and pass that checkpoint")
        log.info("%s: conv1 reads 1 gray channel; it reads the 3 identical gray channels the toolkit feeds "
                 "with its weights split in three (the same function)", path)
    return widened


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or inf weights (a diverged run, a corrupt file) would make every export fail deep inside a
    library; name the tensor instead."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf values (first: {bad[0]}); "
                              f"the training run diverged or the file is corrupt. Use an earlier checkpoint "
                              f"(e.g. best.pt) or train again with a lower --lr")


def load_checkpoint(path: str | Path, spec: PreprocessSpec | None = None) -> Checkpoint:
    """Load any accepted checkpoint. `spec` is required knowledge for foreign formats and, if given
    for a toolkit checkpoint, must agree with the stored one (a silent override would mislabel outputs)."""
    path = Path(path)
    raw = read_raw(path)
    state, source = as_state_dict(raw, path)
    if source == FORMAT:
        try:
            stored = PreprocessSpec.from_dict(raw["spec"])
        except (SpecError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: stored preprocessing spec is invalid: {err}") from err
        if spec is not None and spec != stored:
            raise CheckpointError(f"{path}: carries its own preprocessing ({stored.describe()}); "
                                  f"do not pass a different one")
        _check_head(state, stored, path)
        _check_finite(state, path)
        meta = {k: v for k, v in raw.items() if k not in ("state_dict", "spec", "metrics")}
        return Checkpoint(path, state, stored, raw.get("arch", "resnet18"), dict(raw.get("arch_args", {})),
                          dict(raw.get("metrics", {})), meta, FORMAT, sha256_file(path))
    spec = spec or PreprocessSpec()
    _check_head(state, spec, path)
    _check_finite(state, path)
    state = _gray_stem_as_rgb(state, spec, path)
    log.info("%s: %s weights; using the stated preprocessing: %s", path, source, spec.describe())
    return Checkpoint(path, state, spec, "resnet18", {}, {}, {}, source, sha256_file(path))


def convert_to_toolkit(src: str | Path, dest: str | Path, spec: PreprocessSpec | None = None) -> Path:
    """Turn a foreign state dict into the toolkit format with the stated preprocessing."""
    ckpt = load_checkpoint(src, spec)
    ckpt.build_network()  # proves the weights fit before anything is written
    d = make_checkpoint_dict(ckpt.state_dict, ckpt.spec, arch=ckpt.arch, arch_args=ckpt.arch_args,
                             metrics=ckpt.metrics,
                             extra={"converted_from": {"path": str(src), "format": ckpt.source_format,
                                                       "sha256": ckpt.sha256}})
    return save_checkpoint(d, dest)


def training_split(ckpt: Checkpoint, data: str | Path) -> Path:
    """What to split `data` by: where `data` is the very data this checkpoint was trained on and names no split of
    its own, the run's splits.csv, the exact split training made (with its --seed, --val-frac and --test-frac).
    A split made again here with the defaults would put images the model trained on among the val images that
    verify and score it, and val images among the calibration images. Any other data is split as it is."""
    data = Path(data)
    config = ckpt.meta.get("train_config") or {}
    trained = config.get("data")
    if ckpt.source_format != FORMAT or not trained or ckpt.path is None:
        return data
    try:
        same = data.resolve() == Path(trained).resolve()
    except OSError:
        return data
    if not same:
        return data
    from train.data import discover

    if discover(data).has_split:
        return data
    splits = Path(ckpt.path).parent / "splits.csv"
    if splits.is_file():
        log.info("%s is the data %s was trained on and names no split: using the split training made, %s",
                 data, ckpt.path, splits)
        return splits
    log.warning("%s is the data %s was trained on, but the run's splits.csv is gone: its split is made again "
                "with seed 0 and the default fractions, which match training's only if it used them too (its "
                "config: seed %s, val %s, test %s)", data, ckpt.path,
                config.get("seed"), config.get("val_frac"), config.get("test_frac"))
    return data


def find_latest_checkpoint(runs_dir: str | Path = "runs") -> Path | None:
    """The newest `best.pt` (else `last.pt`) that training wrote under `runs_dir`."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    found = [p for p in runs_dir.rglob("best.pt") if ".partial" not in p.name]
    found = found or [p for p in runs_dir.rglob("last.pt") if ".partial" not in p.name]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
