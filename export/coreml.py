"""`python -m export.coreml`: CoreML ML Programs (.mlpackage) for iOS, with an image input and class labels.

Input contract: 'image', an RGB image (a CVPixelBuffer, 32BGRA or similar; Vision's VNCoreMLRequest or
MLFeatureValue(cgImage:constraint:) converts and resizes any image) of the spec's size. Inside the
model: scale by 1/255, convert to gray with PIL's 'L' weights (ITU-R 601-2; a gray X-ray is unchanged),
repeat to 3 channels, normalize with the spec's mean/std, run the network. So the app does no arithmetic.
Outputs: 'classLabel' (string), 'classLabel_probs' (class -> softmax probability) from the classifier
configuration, and 'logits' (1, classes) float32 for verification and calibrated thresholds.

Variants: fp16 (float16 weights and compute, the default), w8 (8-bit symmetric per-channel weights,
coremltools.optimize.coreml.linear_quantize_weights), palette6 / palette4 (6- and 4-bit k-means LUT
weights, palettize_weights). All target iOS 16 / macOS 13 (the constexpr weight ops need it).
CoreML cannot predict on Linux, so each saved package is verified by reading it back and rebuilding
its weights (export.coreml_verify); on macOS the real predict runs as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from export.cli import add_common_args, run_cli, variants_option
from export.common import ExportError  # noqa: F401  (what this module's checks raise, e.g. check_variants)
from export.common import check_variants, eval_inputs, record_failed, reference_logits, tool_versions, write_proven
from export.manifest import ArtifactEntry
from export.metadata import METADATA_KEY, embedded_metadata, from_json, to_json
from train.checkpoint import Checkpoint
from train.data import Sample
from train.errors import cli_errors
from train.spec import PreprocessSpec

log = logging.getLogger(__name__)

VARIANTS = {  # --variants value -> compression settings; the registry entry is coreml_<variant>
    "fp16": {"weights": "float16"},
    "w8": {"weights": "int8 linear_symmetric per_channel", "api": "linear_quantize_weights", "weight_threshold": 2048},
    "palette6": {"weights": "6-bit LUT (k-means, per tensor)", "api": "palettize_weights", "weight_threshold": 2048},
    "palette4": {"weights": "4-bit LUT (k-means, per tensor)", "api": "palettize_weights", "weight_threshold": 2048},
}
INPUT_NAME, LOGITS_NAME, PROBS_NAME, LABEL_NAME = "image", "logits", "probabilities", "classLabel"
PIL_L_WEIGHTS = (0.299, 0.587, 0.114)  # PIL Image.convert('L'), the gray step of train.spec.load_unit_image
DEPLOYMENT_TARGET = "iOS16"
LICENSE = "Apache-2.0 (toolkit); weights: see the source checkpoint's provenance"


class CoreMLGraph(nn.Module):
    """What the .mlpackage computes: RGB [0, 1] -> gray -> 3 channels -> DeployModel -> (probs, logits).

    The network is BatchNorm-folded first (torch.fx fuse), so every CoreML weight has exactly one
    PyTorch tensor it came from, which is what the weight reconstruction compares against."""

    def __init__(self, deploy_model: nn.Module) -> None:
        super().__init__()
        from torch.fx.experimental.optimization import fuse

        self.model = fuse(deploy_model.eval())
        self.register_buffer("luma", torch.tensor(PIL_L_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gray = (x * self.luma).sum(dim=1, keepdim=True)
        logits = self.model(gray.expand(-1, 3, -1, -1))
        return torch.softmax(logits, dim=1), logits

    def weight_modules(self) -> list[tuple[str, nn.Module]]:
        """Conv/Linear modules in execution order (the order CoreML's conv/linear ops appear in)."""
        mods = dict(self.model.named_modules())
        return [(str(n.target), mods[str(n.target)]) for n in self.model.graph.nodes
                if n.op == "call_module" and isinstance(mods[str(n.target)], (nn.Conv2d, nn.Linear))]


def _image_input(spec: PreprocessSpec) -> Any:
    import coremltools as ct

    return ct.ImageType(name=INPUT_NAME, shape=(1, 3, spec.input_size, spec.input_size), scale=1 / 255.0,
                        color_layout=ct.colorlayout.RGB, channel_first=True)


def _convert_base(graph: CoreMLGraph, spec: PreprocessSpec, target: str) -> Any:
    """Trace and convert without the classifier (coremltools 9 cannot add a classifier to a model with an
    extra output when it sets fp16 output types, nor re-save a loaded classifier after compression)."""
    import coremltools as ct

    example = torch.rand(1, 3, spec.input_size, spec.input_size)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph.eval(), example, check_trace=False)
        return ct.convert(traced, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                          minimum_deployment_target=getattr(ct.target, target),
                          inputs=[_image_input(spec)],
                          outputs=[ct.TensorType(name=PROBS_NAME, dtype=np.float32),
                                   ct.TensorType(name=LOGITS_NAME, dtype=np.float32)])


def _compress(base: Any, variant: str) -> Any:
    import coremltools.optimize.coreml as cto

    if variant == "fp16":
        return base
    if variant == "w8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=2048)
        return cto.linear_quantize_weights(base, cto.OptimizationConfig(global_config=op))
    bits = int(variant.removeprefix("palette"))
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor", weight_threshold=2048)
    return cto.palettize_weights(base, cto.OptimizationConfig(global_config=op))


def _with_classifier(model: Any, spec: PreprocessSpec, target: str) -> Any:
    """Re-convert the (compressed) ML Program with a classifier on 'probabilities', keeping 'logits'."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    proto = model.get_spec()
    prog = load_milproto(model_spec=proto, specification_version=proto.specificationVersion,
                         file_weights_dir=model.weights_dir)
    main = prog.functions["main"]
    main.output_types = None  # the extra 'logits' output breaks the count otherwise
    # a loaded program forgets that its input is an image (the 1/255 scaling is already an op in it)
    main.set_input_types((_image_input(spec),))
    return ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                      minimum_deployment_target=getattr(ct.target, target),
                      classifier_config=ct.ClassifierConfig(list(spec.class_names),
                                                            predicted_probabilities_output=PROBS_NAME))


def _set_metadata(model: Any, ckpt: Checkpoint, variant: str, version: str) -> None:
    spec = ckpt.spec
    model.short_description = (f"{spec.num_classes}-class chest X-ray classifier (ResNet-18), CoreML {variant}. "
                               f"Research software, not a medical device.")
    model.author = "cxr-mobile-export toolkit"
    model.license = LICENSE
    model.version = version
    model.input_description[INPUT_NAME] = (
        f"RGB (or gray) image, {spec.input_size}x{spec.input_size}, resized ({spec.resize}) from the "
        f"radiograph; converted to gray, scaled by 1/255 and normalized inside the model")
    model.output_description[LABEL_NAME] = "most probable class"
    model.output_description[LABEL_NAME + "_probs"] = "softmax probability per class"
    model.output_description[LOGITS_NAME] = f"raw logits (1, {spec.num_classes}) in class order {list(spec.class_names)}"
    meta = {"classes": json.dumps(list(spec.class_names)), "preprocessing": json.dumps(spec.to_dict()),
            "preprocessing_description": spec.describe(),
            "in_model_preprocessing": f"x/255 -> gray (weights {list(PIL_L_WEIGHTS)}) -> 3 channels -> "
                                      f"(x - mean) / std", "variant": variant,
            "compression": json.dumps(VARIANTS[variant]), "source_checkpoint_sha256": str(ckpt.sha256),
            "outputs": f"{LABEL_NAME}, {LABEL_NAME}_probs, {LOGITS_NAME}"}
    for k, v in meta.items():
        model.user_defined_metadata[k] = v


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The toolkit's metadata from the package's user-defined metadata (the spec only: no CoreML runtime needed)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return from_json(dict(spec.description.metadata.userDefined).get(METADATA_KEY))


def describe(path: Path) -> dict[str, Any]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return {"spec_version": spec.specificationVersion, "model_type": spec.WhichOneof("Type"),
            "inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output],
            "version": spec.description.metadata.versionString, "classifier": spec.description.predictedFeatureName}


def _package_version() -> str:
    versions = tool_versions(("cxr-mobile-export",))
    v = versions["cxr-mobile-export"]
    return "0.1.0" if v == "not installed" else v


def export_coreml(ckpt: Checkpoint, out_dir: Path, *, eval_samples: list[Sample] | None = None,
                  calib_samples: list[Sample] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                  target: str = DEPLOYMENT_TARGET, **_: Any) -> list[ArtifactEntry]:
    """One .mlpackage per variant, each read back and verified (weight reconstruction + fp16 drift on
    the eval images; real predict on macOS). calib_samples is unused: CoreML compression here is weight-only."""
    check_variants(variants, VARIANTS)
    out_dir = Path(out_dir)
    try:
        import coremltools as ct
    except ImportError as err:
        return [record_failed(ckpt, out_dir, f"coreml_{v}", f"coremltools is not installed ({err}); pip install "
                              f"coremltools") for v in variants]
    from export.coreml_verify import verify_package

    inputs = eval_inputs(ckpt, eval_samples)
    x = inputs.x
    ref = reference_logits(ckpt, x)
    labels = np.array([s.label for s in eval_samples]) if eval_samples else None
    graph = CoreMLGraph(ckpt.build_deploy_model())
    version = f"{_package_version()}+ckpt.{(ckpt.sha256 or 'unknown')[:12]}"
    state: dict[str, Any] = {}
    rows = []
    for variant in variants:
        settings = VARIANTS[variant]

        def write(tmp: Path, variant: str = variant) -> dict[str, Any]:
            if "base" not in state:  # converted once, compressed per variant
                state["base"] = _convert_base(graph, ckpt.spec, target)
            model = _with_classifier(_compress(state["base"], variant), ckpt.spec, target)
            _set_metadata(model, ckpt, variant, version)
            meta = embedded_metadata(ckpt, f"coreml_{variant}")
            model.user_defined_metadata[METADATA_KEY] = to_json(meta)
            model.save(str(tmp))
            return {"coremltools": ct.__version__, "model_version": version, "embedded_metadata": read_metadata(tmp)}

        details = {"variant": variant, "compression": settings, "minimum_deployment_target": target,
                   "compute_precision": "float16", "input": INPUT_NAME, "input_type": "ImageType RGB, scale 1/255",
                   "input_size": ckpt.spec.input_size, "outputs": [LABEL_NAME, LABEL_NAME + "_probs", LOGITS_NAME],
                   "classes": list(ckpt.spec.class_names), "conversion": "torch.jit.trace -> ct.convert (mlprogram)",
                   "batchnorm": "folded into conv before conversion", "spec": ckpt.spec.to_dict()}
        rows.append(write_proven(ckpt, out_dir, f"coreml_{variant}", details=details, write=write,
                                 prove=lambda p, v=variant: verify_package(p, graph, ckpt.spec, v, x, ref, inputs,
                                                                           labels)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.coreml", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated variants to write: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--target", default=DEPLOYMENT_TARGET, choices=("iOS16", "iOS17", "iOS18"),
                   help="minimum deployment target (default iOS16; the compressed weight ops need >= iOS16)")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), export_coreml, argv,
                   lambda a: {"variants": variants_option(a.variants, VARIANTS),
                              "target": a.target})


if __name__ == "__main__":
    sys.exit(main())
