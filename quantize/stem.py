"""ResNet's stem convolution rewritten for int8 kernels: space-to-depth, then a 4x4 convolution.

Why: int8 convolution kernels read input channels in groups (XNNPACK's x86 VNNI kernels take 8 at a time, ONNX
Runtime's im2col copies one pixel's channels per kernel tap), so the 7x7 stride-2 stem over 3 channels wastes most
of its work: on a 2-core AMD EPYC (Zen 4, 1 thread) it took 15% of ONNX Runtime's int8 inference for 6.5% of the
multiply-adds (1.62 ms against 0.57 ms for a layer1 convolution of the same size), and ExecuTorch's int8 stem
0.89 of 5.15 ms (2 threads). Rearranged, the same convolution runs over 12 channels with 16 taps:

    conv 7x7 / 2, pad 3, C channels  ==  space-to-depth 2  ->  zero pad (2 before, 1 after)  ->  conv 4x4 / 1, 4C

exact in real arithmetic (the 7x7 kernel gets a zero first row and column to make it 8x8; each 2x2 phase of that
becomes one group of C channels), within float rounding in practice. Channels come out in the order ONNX's
SpaceToDepth and NHWC reshapes give: (row phase, column phase, channel). Measured, random-calibrated files, 1 thread:
ONNX Runtime int8 10.03 -> 9.56 ms, ExecuTorch int8 10.42 -> 9.68 ms. Float kernels gain nothing (ONNX Runtime
33.8 -> 34.5 ms, ExecuTorch 33.3 -> 33.7 ms: the extra zero taps cost more than the channel groups save), so
only int8 recipes use it: ONNX Runtime's static int8 (on the float ONNX graph, `space_to_depth_stem_onnx`),
ExecuTorch's and LiteRT's PT2E int8 (on the PyTorch model; LiteRT's NHWC graph moves the space-to-depth in
front of its transpose, LiteRT int8 10.28 -> 9.62 ms). ONNX Runtime Mobile's phone files undo it
(`undo_space_to_depth_stem_onnx`), as its NNAPI provider takes no SpaceToDepth. On Arm, XNNPACK's dot-product
int8 kernels read 4 channels at a time (3 -> 4, and 12 exactly), so there the rewrite is about even; its i8mm
kernels read 8, like x86's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 2
PAD_BEFORE, PAD_AFTER = 2, 1  # the 8x8 kernel's taps 0..7 sit at input offsets -4..3, i.e. phases -2..1 of 2
NOTE = ("stem convolution (7x7 / 2 over 3 channels) rewritten as space-to-depth 2 -> 4x4 convolution over 12 "
        "channels, exact in float (quantize.stem): int8 kernels read channels in groups")


def is_stem(kernel: tuple[int, ...], stride: tuple[int, ...], pad: tuple[int, ...], dilation: tuple[int, ...],
            groups: int) -> bool:
    """ResNet's stem shape: 7x7, stride 2, padding 3 on every side, no dilation or groups."""
    return (tuple(kernel) == (7, 7) and tuple(stride) == (2, 2) and set(pad) == {3} and set(dilation) == {1}
            and groups == 1)


def space_to_depth_weight(w: np.ndarray) -> np.ndarray:
    """(O, C, 7, 7) stem weights -> (O, 4C, 4, 4): w8[o, c, 2s+a, 2t+b] -> W[o, (2a+b)C + c, s, t], where w8 is
    w with a zero first row and column."""
    o, c = w.shape[:2]
    w8 = np.pad(w, ((0, 0), (0, 0), (1, 0), (1, 0)))
    return np.ascontiguousarray(w8.reshape(o, c, 4, BLOCK, 4, BLOCK).transpose(0, 3, 5, 1, 2, 4)
                                .reshape(o, BLOCK * BLOCK * c, 4, 4))


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2), channels ordered (row phase, column phase, channel) like ONNX's."""
    n, c, h, w = x.shape
    return (x.reshape(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).permute(0, 3, 5, 1, 2, 4)
            .reshape(n, BLOCK * BLOCK * c, h // BLOCK, w // BLOCK))


def space_to_depth_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/2, W/2, 4C), the same channel order: for graphs whose input is NHWC (LiteRT's)."""
    n, h, w, c = x.shape
    return (x.reshape(n, h // BLOCK, BLOCK, w // BLOCK, BLOCK, c).permute(0, 1, 3, 2, 4, 5)
            .reshape(n, h // BLOCK, w // BLOCK, BLOCK * BLOCK * c))


class SpaceToDepthStem(nn.Module):
    """A drop-in for the stem convolution `conv` (same input, same output). With `input_moved`, it takes the
    space-to-depth input instead, which an NHWC graph computes before its transpose (NhwcDeployModel)."""

    def __init__(self, conv: nn.Conv2d, input_moved: bool = False) -> None:
        super().__init__()
        self.input_moved = input_moved
        self.conv = nn.Conv2d(BLOCK * BLOCK * conv.in_channels, conv.out_channels, 4, bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(space_to_depth_weight(conv.weight.detach().numpy())))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x if self.input_moved else space_to_depth(x)
        return self.conv(F.pad(z, (PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER)))


def space_to_depth_stem(model: nn.Module, input_size: int, input_moved: bool = False) -> nn.Module:
    """`model` (a DeployModel around a torchvision ResNet) with its stem rewritten, in place; unchanged where
    the stem is not ResNet's or the input size is odd. `input_moved`: see SpaceToDepthStem."""
    conv = getattr(getattr(model, "net", None), "conv1", None)
    if (isinstance(conv, nn.Conv2d) and input_size % BLOCK == 0
            and is_stem(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)):
        model.net.conv1 = SpaceToDepthStem(conv, input_moved)
    return model


def space_to_depth_stem_onnx(src: Path, dst: Path, keep: set[str] = frozenset()) -> dict[str, Any] | None:
    """The same rewrite on a float ONNX graph whose convolutions carry their weights (BatchNorm folded): the
    stem Conv becomes SpaceToDepth + a 4x4 Conv under the old node's name (so node lists such as
    `nodes_to_exclude` still find it). Writes `dst` and says what it did; None (nothing written) where the
    graph has no such stem, its input size is odd or unknown, or the stem is in `keep` (left in float)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.name in keep or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = numpy_helper.to_array(inits[node.input[1]])
        if (w.ndim != 4 or not is_stem(w.shape[2:], attrs.get("strides", (1, 1)), attrs.get("pads", (0,) * 4),
                                       attrs.get("dilations", (1, 1)), attrs.get("group", 1))
                or not _even_input(graph, node.input[0])):
            continue
        moved = f"{node.input[0]}_space_to_depth"
        weight = numpy_helper.from_array(space_to_depth_weight(w), f"{node.input[1]}_space_to_depth")
        graph.initializer.remove(inits[node.input[1]])
        graph.initializer.append(weight)
        conv = helper.make_node("Conv", [moved, weight.name, *node.input[2:]], list(node.output), name=node.name,
                                kernel_shape=[4, 4], strides=[1, 1],
                                pads=[PAD_BEFORE, PAD_BEFORE, PAD_AFTER, PAD_AFTER])
        s2d = helper.make_node("SpaceToDepth", [node.input[0]], [moved], name=f"{node.name}_space_to_depth",
                               blocksize=BLOCK)
        graph.node.remove(node)
        graph.node.insert(i, conv)
        graph.node.insert(i, s2d)
        onnx.save(model, str(dst))
        return {"rewritten": node.name, "weight": [int(d) for d in weight.dims], "note": NOTE}
    return None


def _even_input(graph: Any, name: str) -> bool:
    """Whether `name`'s height and width are known and even (shape inference has run: ORT's pre-pass)."""
    for info in [*graph.value_info, *graph.input]:
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            return len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value % BLOCK == 0 for d in dims[2:])
    return False


def undo_space_to_depth_stem_onnx(src: Path, dst: Path) -> str | None:
    """The rewritten stem of an ONNX graph (float, or int8 in QDQ form) turned back into the 7x7 / 2 convolution,
    without calibrating again: SpaceToDepth only moves values, so the activation's quantization stays valid in
    front of it, and the 4x4 weights (int8 or float) map back exactly, dropping the zero first row and column.
    For phone accelerators: ONNX Runtime's NNAPI provider takes no SpaceToDepth. Writes `dst` and returns the
    stem's node name; None (nothing written) where the graph has no rewritten stem."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    s2d = next((n for n in graph.node if n.op_type == "SpaceToDepth" and n.name.endswith("_space_to_depth")), None)
    conv = next((n for n in graph.node if s2d is not None and n.op_type == "Conv"
                 and n.name == s2d.name[:-len("_space_to_depth")]), None)
    if conv is None:
        return None
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    weight = conv.input[1] if conv.input[1] in inits else producers[conv.input[1]].input[0]  # float, or DQ's int8
    w4 = numpy_helper.to_array(inits[weight])
    o, c4 = w4.shape[:2]
    w8 = w4.reshape(o, BLOCK, BLOCK, c4 // 4, 4, 4).transpose(0, 3, 4, 1, 5, 2).reshape(o, c4 // 4, 8, 8)
    if w8[:, :, 0, :].any() or w8[:, :, :, 0].any():
        raise ValueError(f"{src}: {conv.name} is not a rewritten stem (its first row and column are not zero)")
    inits[weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w8[:, :, 1:, 1:]), weight))
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [7, 7]), helper.make_attribute("strides", [2, 2]),
                           helper.make_attribute("pads", [3, 3, 3, 3])])
    stale = _downstream(graph, s2d.output[0], stop=conv)
    for node in graph.node:  # whatever read the moved values reads the original ones
        node.input[:] = [s2d.input[0] if i == s2d.output[0] else i for i in node.input]
    graph.node.remove(s2d)
    kept = [v for v in graph.value_info if v.name not in stale]  # shapes of the 4C-channel tensors are wrong now
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _drop_suffix(graph, "_space_to_depth")
    onnx.save(model, str(dst))
    return conv.name


def _drop_suffix(graph: Any, suffix: str) -> None:
    """Tensor names as the quantizer gives them without the rewrite (`div_scale`, not `div_space_to_depth_scale`)."""
    def name(n: str) -> str:
        return n.replace(suffix, "")

    for t in graph.initializer:
        t.name = name(t.name)
    for node in graph.node:
        node.input[:] = [name(i) for i in node.input]
        node.output[:] = [name(o) for o in node.output]
    for v in graph.value_info:
        v.name = name(v.name)


def _downstream(graph: Any, name: str, stop: Any) -> set[str]:
    """Tensor names from `name` up to (not past) the node `stop`: the stem's Quantize/Dequantize pair."""
    names, frontier = {name}, [name]
    while frontier:
        current = frontier.pop()
        for node in graph.node:
            if current in node.input and node is not stop:
                new = set(node.output) - names
                names |= new
                frontier.extend(new)
    return names
