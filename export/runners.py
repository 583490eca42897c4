"""One Runner per runtime: `load(path)`, then `run(batch) -> logits`.

Export verification and the benchmarks use these same classes, so each runtime has exactly one code
path. Every runner takes float32 (N, 3, H, W) in [0, 1] (normalization is inside each model) and
returns float32 (N, classes) logits as NumPy. Heavy runtimes are imported only when used.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from train.cpu import quota_threads
from train.errors import ToolkitError


class RunnerError(ToolkitError, RuntimeError):
    """A runtime that is unavailable here or an artifact it cannot load."""


# Intra-op threads of a runner made without `threads` (None: each runtime's own default, or the cores a container's
# CPU quota allows, which no runtime sees: train.cpu.quota_threads). A parallel export's workers set it to their
# share of the cores (export.parallel).
DEFAULT_THREADS: int | None = None


class Runner:
    """Base class. `threads` is the intra-op thread count; `engine` the quantized engine where relevant."""

    runtime = "base"
    # The Python modules the runtime lives in. The benchmark imports them before it times a load: an app embeds the
    # runtime and never pays this import (ExecuTorch's bindings import its whole compiler package, ~5 s).
    modules: tuple[str, ...] = ()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this runtime cannot run on this machine (None: it can)."""
        return None

    def __init__(self, threads: int | None = None, engine: str | None = None) -> None:
        self.threads = threads if threads is not None else (DEFAULT_THREADS or quota_threads())
        self.engine = engine
        self.model: Any = None

    def load(self, path: str | Path) -> "Runner":
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run_in_batches(self, images: np.ndarray, batch: int = 16) -> np.ndarray:
        """Logits of many images, `batch` at a time: on one thread a batch of 8-16 ran 13-15% faster per image
        than one batch of 96 (eager and ONNX Runtime), whose activations no longer fit the caches."""
        return np.concatenate([self.run(images[i:i + batch]) for i in range(0, len(images), batch)])

    def with_threads(self, threads: int, path: str | Path) -> "Runner":
        """This runner at `threads` intra-op threads: a fresh one loaded from `path` (sessions fix their pool)."""
        return type(self)(threads=threads, engine=self.engine).load(path)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "threads": self.threads, "engine": self.engine}


class _TorchRunner(Runner):
    """Shared by the eager, TorchScript and lite-interpreter runners: same tensors, different loaders.
    The quantized engine is set only while a model loads (packed weights are made then) and runs, and the
    process gets its previous engine back (quantize.torch_ao.quantized_engine)."""

    modules = ("torch",)

    def _configure(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)

    def with_threads(self, threads: int, path: str | Path) -> "Runner":
        import torch

        torch.set_num_threads(threads)  # torch's pool is per process and resizable in place
        self.threads = threads
        return self

    def _engine(self) -> Any:
        from quantize.torch_ao import quantized_engine

        return quantized_engine(self.engine) if self.engine else contextlib.nullcontext()

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with self._engine(), torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return out.detach().float().numpy()


class EagerRunner(_TorchRunner):
    """The float PyTorch model, from a checkpoint: the baseline every artifact is compared with."""

    runtime = "torch-eager"

    def load(self, path: str | Path) -> "EagerRunner":
        from train.checkpoint import load_checkpoint
        from train.model import channels_last

        self._configure()
        self.model = channels_last(load_checkpoint(path).build_deploy_model())
        return self

    def use_module(self, module: Any) -> "EagerRunner":
        """Run an in-memory module (e.g. a freshly quantized one) through the same code path."""
        self._configure()
        self.model = module.eval()
        return self


class TorchScriptRunner(_TorchRunner):
    runtime = "torchscript"

    def load(self, path: str | Path) -> "TorchScriptRunner":
        import torch

        self._configure()
        try:
            with self._engine(), warnings.catch_warnings():  # TorchScript's deprecation: the README says so
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:
            raise RunnerError(f"torch.jit.load cannot load {path}: {err}") from err
        return self


class LiteRunner(_TorchRunner):
    """The PyTorch Mobile lite interpreter: the same C++ runtime the Flutter plugins embed."""

    runtime = "pytorch-lite"

    def load(self, path: str | Path) -> "LiteRunner":
        from torch.jit.mobile import _load_for_lite_interpreter

        self._configure()
        try:
            with self._engine():
                self.model = _load_for_lite_interpreter(str(path))
        except ToolkitError:
            raise
        except Exception as err:
            raise RunnerError(f"the lite interpreter cannot load {path}: {err}") from err
        return self


def onnx_session_options(threads: int | None = None):
    """The toolkit's ONNX Runtime settings: ORT's default graph optimizations (ORT_ENABLE_ALL), sequential
    execution, `threads` intra-op threads (ORT's default when None). The benchmark and the profiler use these."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class OnnxRunner(Runner):
    """ONNX Runtime (.onnx and .ort files), CPU execution provider, sequential execution. A file whose batch
    is fixed (the ORT Mobile files, batch 1) runs a larger batch one image at a time."""

    runtime = "onnxruntime"
    modules = ("onnxruntime",)

    def load(self, path: str | Path) -> "OnnxRunner":
        import onnxruntime as ort

        try:
            self.model = ort.InferenceSession(str(path), onnx_session_options(self.threads),
                                              providers=["CPUExecutionProvider"])
        except Exception as err:
            raise RunnerError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.engine = self.engine or "CPUExecutionProvider"
        first = self.model.get_inputs()[0]
        self._input = first.name
        self._fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        return self

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._fixed_batch == 1 and len(batch) != 1:
            return np.concatenate([self.model.run(None, {self._input: x[None]})[0] for x in batch])
        return self.model.run(None, {self._input: batch})[0]


class ExecuTorchRunner(Runner):
    """The ExecuTorch runtime's Python bindings (XNNPACK delegate compiled in). Batch size is fixed at
    export time, so a larger batch runs one image at a time.

    It loads the bindings' compiled module (`executorch.extension.pybindings._C`, the functions
    `executorch.runtime` and `portable_lib` re-export) directly: importing those two imports ExecuTorch's
    compiler first (`executorch.exir`), 3.3 s of every process that only runs a .pte, where `_C` takes none."""

    runtime = "executorch"
    modules = ("torch", "executorch.extension.pybindings._C")

    def load(self, path: str | Path) -> "ExecuTorchRunner":
        bindings = self.bindings()
        if self.threads:
            self.threads = self._set_threads(bindings, self.threads)
        try:
            self.model = bindings._load_for_executorch(str(path))
        except Exception as err:
            raise RunnerError(f"the ExecuTorch runtime cannot load {path}: {err}") from err
        self.engine = self.engine or "XnnpackBackend"
        return self

    @staticmethod
    def bindings() -> Any:
        """The runtime's compiled bindings module."""
        try:
            import torch  # noqa: F401  (the bindings link against torch's libraries: load them first)
            from executorch.extension.pybindings import _C
        except ImportError as err:
            raise RunnerError(f"executorch is not installed ({err}); pip install executorch") from err
        return _C

    @staticmethod
    def _set_threads(bindings: Any, threads: int) -> int:
        """Size ExecuTorch's own threadpool, on which XNNPACK runs (torch.set_num_threads does not reach it),
        before a program loads: a loaded method keeps the parallelism it was loaded with (resized from 1 to 2
        threads afterwards it still took 33.7 ms; loaded afresh, 17.6 ms), so with_threads loads the file again.
        Returns the pool's size."""
        if bindings._threadpool_get_thread_count() != int(threads):
            bindings._unsafe_reset_threadpool(int(threads))
        return int(bindings._threadpool_get_thread_count())

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        outs = [self.model.forward([torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32))])[0]
                for x in batch]
        return torch.cat(outs).float().numpy()


class LiteRTRunner(Runner):
    """LiteRT's own interpreter (ai-edge-litert, with its default XNNPACK delegate: what tflite_flutter embeds).
    Takes the toolkit's NCHW batch like every runner and feeds each image in the file's own layout (NHWC files
    get a transpose) and dtype; quantized outputs are dequantized with the file's scale and zero point."""

    runtime = "litert"
    modules = ("ai_edge_litert.interpreter",)

    def load(self, path: str | Path) -> "LiteRTRunner":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise RunnerError(f"ai-edge-litert is not installed ({err}); pip install ai-edge-litert") from err
        try:
            self.model = Interpreter(model_path=str(path), num_threads=self.threads or None)
            self.model.allocate_tensors()
        except Exception as err:
            raise RunnerError(f"the LiteRT interpreter cannot load {path}: {err}") from err
        self._in, self._out = self.model.get_input_details()[0], self.model.get_output_details()[0]
        shape = tuple(self._in["shape"])
        self.layout = "NHWC" if shape[-1] == 3 and shape[1] != 3 else "NCHW"
        self.engine = self.engine or "XNNPACK"
        return self

    def run(self, batch: np.ndarray) -> np.ndarray:
        outs = []
        for x in np.asarray(batch, dtype=np.float32):
            x = x.transpose(1, 2, 0) if self.layout == "NHWC" else x
            scale, zero = self._in["quantization"]
            if scale:  # an integer input tensor: quantize as the file says
                x = np.clip(np.round(x / scale + zero), -128, 127)
            self.model.set_tensor(self._in["index"], np.ascontiguousarray(x[None], dtype=self._in["dtype"]))
            self.model.invoke()
            out = self.model.get_tensor(self._out["index"]).astype(np.float32)
            scale, zero = self._out["quantization"]
            outs.append((out - zero) * scale if scale else out)
        return np.concatenate(outs)


class CoreMLRunner(Runner):
    """CoreML prediction. Only macOS has the CoreML framework; elsewhere `load` says so."""

    runtime = "coreml"
    modules = ("coremltools",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if platform.system() != "Darwin":
            return ("CoreML prediction needs macOS; on this machine CoreML packages are verified by weight "
                    "reconstruction instead (export.coreml)")
        return None

    def load(self, path: str | Path) -> "CoreMLRunner":
        if self.unavailable_reason():
            raise RunnerError(self.unavailable_reason())
        import coremltools as ct

        self.model = ct.models.MLModel(str(path))
        spec = self.model.get_spec()
        self._input = spec.description.input[0].name
        self._logits = "logits"
        return self

    def run(self, batch: np.ndarray) -> np.ndarray:
        from PIL import Image

        outs = []
        for x in batch:
            gray = Image.fromarray((x[0] * 255).round().astype(np.uint8), mode="L").convert("RGB")
            outs.append(np.asarray(self.model.predict({self._input: gray})[self._logits], dtype=np.float32).reshape(-1))
        return np.stack(outs)


RUNNERS: dict[str, Callable[..., Runner]] = {
    r.runtime: r for r in (EagerRunner, TorchScriptRunner, LiteRunner, OnnxRunner, ExecuTorchRunner, LiteRTRunner,
                            CoreMLRunner)
}


def get_runner(runtime: str, threads: int | None = None, engine: str | None = None) -> Runner:
    if runtime not in RUNNERS:
        raise RunnerError(f"unknown runtime {runtime!r}; known: {sorted(RUNNERS)}")
    return RUNNERS[runtime](threads=threads, engine=engine)
