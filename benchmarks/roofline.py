"""The CPU's GEMM ceiling at 1 thread: how fast this machine multiplies matrices in fp32 and in int8
(uint8 x int8), measured with ONNX Runtime's own kernels (MLAS) on ResNet-18's convolution shapes.

Latency targets such as "int8 at least 3.6x faster than float" depend on the CPU: with VNNI an int8 multiply-add
costs about a quarter of an fp32 one, without it about half. The ratio of the two ceilings is the int8 speedup this
CPU allows a runtime whose int8 convolutions are as efficient as its float ones, and each file's GFLOP/s against
its ceiling says how close its runtime gets. Measured, not read off a spec sheet, because a VM's reported clock is
nominal and cores differ in how many vector units they have (an AMD Zen 4 runs each 512-bit FMA as two halves).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

# The im2col GEMMs of ResNet-18's four 3x3-convolution stages at 224 px, batch 1: (M output pixels,
# K = input channels x 9, N output channels). Each stage does about the same number of multiply-adds.
RESNET18_GEMMS: tuple[tuple[int, int, int], ...] = ((3136, 576, 64), (784, 1152, 128), (196, 2304, 256),
                                                   (49, 4608, 512))
METHOD = ("ONNX Runtime MatMul (fp32) and MatMulInteger (uint8 x int8 -> int32), CPU provider, 1 thread, "
          "the fastest of ResNet-18's 3x3-convolution GEMM shapes at 224 px, best of {repeats} runs each")


def _session(k: int, n: int, int8: bool) -> Any:
    """A one-node ONNX model, C = A @ B with B a constant (as a convolution's weights are), in a 1-thread session."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
        node, a_type, c_type = helper.make_node("MatMulInteger", ["A", "B"], ["C"]), TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((k, n), dtype=np.float32)
        node, a_type, c_type = helper.make_node("MatMul", ["A", "B"], ["C"]), TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, ["M", k])],
                              [helper.make_tensor_value_info("C", c_type, ["M", n])],
                              [numpy_helper.from_array(weight, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by every ONNX Runtime the project supports
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _best_seconds(session: Any, a: np.ndarray, repeats: int) -> float:
    session.run(None, {"A": a})  # warm-up: first-run allocations and packing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_ceiling(shapes: Sequence[tuple[int, int, int]] = RESNET18_GEMMS, repeats: int = 25) -> dict[str, Any]:
    """The fastest fp32 GFLOP/s and int8 GOP/s (2 operations per multiply-add) over `shapes`, the kernels' peak
    on this core, and their ratio; without ONNX Runtime, a dict with the reason instead."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return {"error": f"ONNX Runtime is not installed ({err}); no GEMM ceiling measured"}
    rng = np.random.default_rng(1)
    fp32 = int8 = 0.0
    for m, k, n in shapes:
        ops = 2 * m * k * n / 1e9
        fp32 = max(fp32, ops / _best_seconds(_session(k, n, int8=False), rng.random((m, k), dtype=np.float32),
                                             repeats))
        int8 = max(int8, ops / _best_seconds(_session(k, n, int8=True),
                                             rng.integers(0, 256, (m, k), dtype=np.uint8), repeats))
    return {"fp32_gflops": round(fp32, 1), "int8_gops": round(int8, 1), "int8_over_fp32": round(int8 / fp32, 2),
            "threads": 1, "method": METHOD.format(repeats=repeats)}
