"""Shared fixtures: tiny generated data and a tiny checkpoint, so every test runs without ../shared.

Tests that need the real data or reference weights use `shared_data` / `reference_weights`, which skip
cleanly where ../shared is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads that spin make small tests several times slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from train.checkpoint import make_checkpoint_dict, save_checkpoint
from train.data import SYNTHETIC_MARKER
from train.model import build_network
from train.spec import PreprocessSpec
from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED", REPO.parent / "shared"))
TINY_SIZE = 32  # pixels: ResNet-18 still runs (1x1 at layer4), tests stay fast on 2 cores
# pytest-xdist runs the suite in one worker per core (pyproject.toml's addopts): each worker's torch gets its
# share of the cores, so two workers on 2 cores do not each start 2 threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(items) -> None:
    """Keep each test module in one xdist worker (--dist loadgroup), so module fixtures are built once; a
    module marked xdist_group (the export modules share `all_formats`) keeps its group."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True)
def no_container_limits(monkeypatch) -> None:
    """The suite runs alike on every CI machine: a container's CPU quota or memory limit, read from the real
    cgroup files, would change worker and thread counts (and run each export format in its own process) under
    the tests. The cgroup code itself is tested on files the tests write (test_export_parallel.py)."""
    import train.cgroup

    monkeypatch.setattr(train.cgroup, "PROC_CGROUP", "/nonexistent/proc-self-cgroup")
    train.cgroup.cpu_limit.cache_clear()


@pytest.fixture(scope="session")
def tiny_spec() -> PreprocessSpec:
    return PreprocessSpec(input_size=TINY_SIZE)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """12 generated images per class in the COVID-19 Radiography layout (no split given), standing in for a
    user's folder of real images: without the SYNTHETIC marker the toolkit treats them as user data, so
    artifacts checked on them are 'verified'. Tests of the synthetic path use `marked_synthetic_data`."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", per_class=12,
                                  size=TINY_SIZE, seed=0)
    (root / SYNTHETIC_MARKER).unlink()
    return root


@pytest.fixture(scope="session")
def marked_synthetic_data(tmp_path_factory) -> Path:
    """The same kind of images, marked SYNTHETIC as train.synthetic writes them: never 'verified'."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("marked") / "data", per_class=6, size=TINY_SIZE, seed=2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_spec) -> Path:
    """A toolkit checkpoint with seeded random weights and BatchNorm statistics that are not trivial
    (so quantization and export comparisons are meaningful)."""
    torch.manual_seed(0)
    net = build_network(num_classes=tiny_spec.num_classes)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, TINY_SIZE, TINY_SIZE))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(make_checkpoint_dict(net.state_dict(), tiny_spec, train_config={"note": "test"}), path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data" / "cxr4"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def reference_weights() -> Path:
    path = SHARED / "models" / "cxr4_resnet18_reference.pt"
    if not path.is_file():
        pytest.skip(f"reference weights not available at {path}")
    return path


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint):
    """The tiny checkpoint, loaded: what every exporter takes."""
    from train.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def synthetic_index(synthetic_data, ckpt):
    """The synthetic dataset indexed in the tiny checkpoint's class order."""
    from train.data import discover

    return discover(synthetic_data, ckpt.spec.class_names)


@pytest.fixture(scope="session")
def export_samples(synthetic_data, ckpt):
    """(verification images from val, calibration images from train) of the synthetic data, as every export
    command takes them (train.data.verification_sets), small enough for fast tests."""
    from train.data import verification_sets

    return verification_sets(synthetic_data, ckpt.spec.class_names, calib_size=8, eval_size=4)


@pytest.fixture(scope="session")
def all_formats(tmp_path_factory, ckpt, export_samples):
    """Every registered format, exported once from the tiny checkpoint through the one pipeline, two formats
    at a time in worker processes (python -m export's default on 2 cores): (folder, {entry name: row}). The
    registry test and each format's own tests read it (their modules share the xdist group 'exports', so one
    worker exports); tests must not change the folder."""
    from export import pipeline
    from export.registry import FORMATS

    out = tmp_path_factory.mktemp("all_formats")
    rows = pipeline.export_all(ckpt, out, eval_samples=export_samples[0], calib_samples=export_samples[1],
                               options=pipeline.format_options(list(FORMATS), "static", x86_isa="auto"), jobs=2)
    return out, {r.name: r for r in rows}


@pytest.fixture(scope="session")
def format_rows(all_formats):
    """format name -> (folder, {entry name: row}) of that format's files in `all_formats`."""
    from export.registry import format_of

    out, rows = all_formats

    def of(fmt: str):
        return out, {name: r for name, r in rows.items() if format_of(name).name == fmt}
    return of


def pytest_sessionfinish(session) -> None:
    """An xdist worker is stopped with a KeyboardInterrupt in its main thread (execnet's interrupt_main); when
    JAX's garbage-collection callback (JAX comes with litert-torch) happens to run then, Python prints the
    interrupt as an ignored exception with a traceback. The callback has nothing left to free at this point."""
    import gc
    import sys

    if "jax" in sys.modules:
        gc.callbacks[:] = [cb for cb in gc.callbacks if getattr(cb, "__name__", "") != "_xla_gc_callback"]
