"""The GPU and multi-process training path, checked on what a CPU can show: global loss normalisation, the
AMP policy, --deterministic, --sync-bn, LOCAL_RANK, loader workers, per-image augmentation seeds, and the
allocator setting that keeps freed memory for the next batch."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from train import recipe
from train.data import ImageDataset, assign_splits, discover
from train.distributed import DeviceError, DistContext, check_local_rank, from_main
from train.loop import train_model
from train.spec import PreprocessSpec, load_unit_image
from train.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("scaling") / "data", per_class=6, size=32, seed=4)


def test_class_weighted_loss_is_normalised_over_the_global_batch():
    """Two ranks' shares, averaged as DDP averages gradients, give the gradient of the whole batch on one
    device; PyTorch's per-rank weighted mean does not when the ranks hold different classes."""
    torch.manual_seed(0)
    weight = torch.tensor([0.5, 1.0, 4.0, 2.0])
    logits = torch.randn(8, 4, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 2, 3, 3, 2])
    full = nn.CrossEntropyLoss(weight=weight)(logits, y)
    (want,) = torch.autograd.grad(full, logits)
    ce_sum = nn.CrossEntropyLoss(weight=weight, reduction="sum")
    halves = [slice(0, 4), slice(4, 8)]
    total_weight = weight[y].sum()
    shares = [recipe.rank_share(ce_sum(logits[h], y[h]), total_weight, 2) for h in halves]
    (got,) = torch.autograd.grad(sum(shares) / 2, logits)
    assert torch.allclose(got, want, atol=1e-6)
    per_rank_mean = sum(nn.CrossEntropyLoss(weight=weight)(logits[h], y[h]) for h in halves) / 2
    (old,) = torch.autograd.grad(per_rank_mean, logits)
    assert not torch.allclose(old, want, atol=1e-3)
    one = recipe.GlobalMeanLoss(weight, DistContext(torch.device("cpu")))  # one process: the usual mean
    assert torch.allclose(one(logits, y), full)


def test_amp_policy(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert recipe.amp_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert recipe.amp_dtype("auto", cuda) == torch.float16  # pre-Ampere GPUs: fp16 and a loss scaler
    assert recipe.amp_dtype("auto", cpu) is None and recipe.amp_dtype("off", cuda) is None
    assert recipe.amp_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(recipe.TrainError, match="--amp fp16 needs a CUDA GPU"):
        recipe.amp_dtype("fp16", cpu)


def test_deterministic_bf16_cpu_run_is_recorded_and_replays(data, tmp_path):
    kw = dict(epochs=1, batch_size=8, input_size=32, workers=0, progress=False, weights="none", evaluate=False,
              amp="bf16", deterministic=True)
    try:
        a = torch.load(train_model(data, tmp_path / "a", **kw), weights_only=True)
        assert torch.are_deterministic_algorithms_enabled()
        b = torch.load(train_model(data, tmp_path / "b", **kw), weights_only=True)
    finally:
        recipe.configure_determinism(False, torch.device("cpu"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(v.dtype != torch.bfloat16 for v in a["state_dict"].values())  # fp32 weights, bf16 only inside
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["train_config"]
    assert cfg["amp"] == "bf16" and cfg["deterministic"] is True and cfg["sync_bn"] is False


def test_sync_bn(monkeypatch):
    from train.model import DeployModel, build_network

    def model():
        return DeployModel(build_network("resnet18", num_classes=4), PreprocessSpec(input_size=32))

    cpu = DistContext(torch.device("cpu"), enabled=True, rank=0, world_size=2)
    with pytest.raises(DeviceError, match="--sync-bn needs CUDA"):
        recipe.apply_sync_bn(model(), True, cpu)
    plain = model()
    assert recipe.apply_sync_bn(plain, True, DistContext(torch.device("cpu"))) is plain  # 1 process: no-op
    gpu = DistContext(torch.device("cuda", 0), enabled=True, rank=0, world_size=2)
    synced = recipe.apply_sync_bn(model(), True, gpu)  # conversion itself needs no GPU
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert synced.net.state_dict().keys() == model().net.state_dict().keys()  # checkpoints unchanged


def test_local_rank_must_have_a_gpu(monkeypatch):
    check_local_rank(1, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK 2 has no GPU: 2 CUDA device\(s\) visible "
                                          r"\(CUDA_VISIBLE_DEVICES=0,1\); launch at most --nproc_per_node=2"):
        check_local_rank(2, 2)


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert recipe.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert recipe.default_workers() == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert recipe.default_workers() == 1


def test_from_main_single_process():
    assert from_main(lambda: 42, DistContext(torch.device("cpu"))) == 42


def _epochs(loader, n):
    out = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat([x for x, _ in loader]))
    return out


def test_augmentation_does_not_depend_on_loader_workers(data):
    """Persistent workers keep their RNG across epochs; the per-position seeds make every image's
    augmentation the same with 0 or 2 workers, and different in the next epoch."""
    idx = assign_splits(discover(data))
    spec = PreprocessSpec(input_size=32)
    cfg = {"batch_size": 4, "balance": "none", "seed": 0}
    ctx = DistContext(torch.device("cpu"))
    inline = _epochs(recipe.make_train_loader(idx, spec, {**cfg, "workers": 0}, ctx), 2)
    pooled_loader = recipe.make_train_loader(idx, spec, {**cfg, "workers": 2}, ctx)
    assert pooled_loader.persistent_workers
    pooled = _epochs(pooled_loader, 2)
    assert torch.equal(inline[0], pooled[0]) and torch.equal(inline[1], pooled[1])
    assert not torch.equal(inline[0], inline[1])


def test_augmenting_one_gray_channel_matches_three(data):
    from train.augment import train_augment

    idx = discover(data)
    spec = PreprocessSpec(input_size=32)
    ds = ImageDataset(idx.samples[:3], spec, augment=train_augment(spec))
    for i in range(3):
        x, _ = ds[(i, 1234 + i)]
        assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
        full = torch.from_numpy(load_unit_image(ds.samples[i].path, spec))  # 3 identical channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234 + i)
            three = train_augment(spec)(full)
        assert torch.allclose(x, three, atol=1e-5)


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path, capsys):
    """The prepared GPU script (benchmarks.gpu_check): its steps on the CPU, and a clear refusal of
    --device cuda where no GPU is visible."""
    from benchmarks.gpu_check import main

    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "none")]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert main(["--device", "cpu", "--size", "32", "--per-class", "8", "--out", str(tmp_path / "dry")]) == 0
    result = json.loads((tmp_path / "dry" / "gpu_check.json").read_text())
    steps = result["steps"]
    assert steps["resume_cpu_to_cpu"]["status"] == "finished"
    assert steps["torchrun_1_process"] == {"backend": "gloo", "replicas_in_sync": True}
    assert steps["amp_epoch"]["images_per_s"] > 0 and result["images"].startswith("SYNTHETIC")
    assert "| 1-process torchrun | backend gloo" in (tmp_path / "dry" / "gpu_check.md").read_text()


# Batched forwards in a fresh process: page faults during the 3rd-6th forward of a batch of 16 at 224 px. Each
# activation (16 x 64 x 112 x 112 floats, 51 MiB) is above the 32 MiB that glibc's dynamic mmap threshold can rise
# to, so under glibc's defaults every one is a fresh mmap, as ResNet-18's stem is at the export's batch of 16. At a
# batch of 8 (25 MiB) glibc's own threshold rise decides, and the default run's faults varied from 12,512 (a CI
# machine) to 75,136 (a Zen 4 EPYC) between runs.
BATCH = 16
STEM_ACTIVATION_PAGES = BATCH * 64 * 112 * 112 * 4 // 4096
FAULTS_OF_REPEATED_BATCHES = f"""
import resource, sys, torch
from train.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, 1, 1)).eval()
x = torch.rand({BATCH}, 3, 224, 224)
with torch.no_grad():
    model(x)
    model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        model(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BATCHES, mode], cwd=repo, text=True,
                         capture_output=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(repo), **env}).stdout.split()
    return out[0] == "True", int(out[1])


def _huge_pages_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[always]" in thp.read_text()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages for every mmap: faults come per 2 MiB")
def test_kept_freed_memory_serves_the_next_batch_without_page_faults():
    """Under glibc's defaults each forward writes its activations into fresh mmaps (a page fault per 4 KiB: 301,080
    faults in 4 forwards, the same in 6 of 6 runs on a Zen 4 EPYC); with train.memory's thresholds the next batch
    reuses the freed blocks (0 faults in 6 of 6; at a batch of 8, 0-84 in 23 of 24 runs and 6,272 in one: hence a
    bound of a fifth, not zero)."""
    applied, kept = _faults("keep")
    _, default = _faults("default")
    opted_out, opted_out_faults = _faults("keep", CXR_DEFAULT_MALLOC="1")
    assert applied and not opted_out
    fresh_pages_at_least = 4 * STEM_ACTIVATION_PAGES  # 4 forwards, each at least its stem's output in new pages
    assert default > fresh_pages_at_least and opted_out_faults > fresh_pages_at_least, (default, opted_out_faults)
    assert kept < default / 5
