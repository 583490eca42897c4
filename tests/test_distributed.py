"""DistributedDataParallel under torchrun: 2 Gloo processes on the CPU, plus the sampler's sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_checkpoint
from train.distributed import DistContext, EpochSampler, replica_fingerprint, replicas_agree
from train.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(torch.device("cpu"), world > 1, rank, world)


@pytest.mark.parametrize("weights", [None, [1.0, 3.0] * 5])
def test_epoch_sampler_shards_and_reshuffles(weights):
    shards = [list(EpochSampler(10, _ctx(r, 3), seed=1, weights=weights)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    if weights is None:  # every index appears, padded like DistributedSampler
        assert set(sum(shards, [])) == set(range(10))
    s = EpochSampler(10, _ctx(0, 1), seed=1, weights=weights)
    e0 = list(s)
    assert list(s) == e0  # same epoch, same order (resume replays it)
    s.set_epoch(1)
    assert list(s) != e0


# Runs `python -m train` under torchrun with one fault injected on rank 1 (chosen by CXR_FAULT).
FAULTS = """
import os, sys, time
import train.data, train.loop
fault, rank = os.environ.get("CXR_FAULT", ""), os.environ["RANK"]
validate, check_images = train.loop._validate, train.data.check_images
def faulty_validate(*a, **k):
    if rank == "1" and fault == "raise":
        raise RuntimeError("injected failure on rank 1")
    if rank == "1" and fault == "hang":
        time.sleep(600)
    return validate(*a, **k)
def faulty_check_images(*a, **k):
    if rank == "1" and fault == "cannot_decode":
        raise OSError("rank 1 cannot read the shared filesystem")
    return check_images(*a, **k)
train.loop._validate, train.data.check_images = faulty_validate, faulty_check_images
from train.__main__ import main
sys.exit(main())
"""


def _torchrun(args: list[str], tmp: Path, fault: str | None = None, expect_ok: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CXR_FAULT": fault or ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    target = ["-m", "train"]
    if fault is not None:
        (tmp / "faults.py").write_text(FAULTS)
        target = [str(tmp / "faults.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           *target, *args, "--no-progress"]
    # Own process group, so a hung launch is killed with its ranks instead of outliving the test.
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    assert (proc.returncode == 0) == expect_ok, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _check_in_sync(out: Path, epochs_done: int) -> dict:
    config = json.loads((out / "config.json").read_text())
    check = config["ddp_check"]
    assert config["world_size"] == 2 and check["backend"] == "gloo" and check["world_size"] == 2
    r0, r1 = check["per_rank"]
    assert r0["state_sha256"] == r1["state_sha256"] and check["same_weights"] is True
    assert check["replicas_in_sync"] is True and check["max_logit_diff"] <= check["logit_tolerance"]
    # the saved checkpoint is the replica every rank held: same outputs on the same fixed input
    saved = load_checkpoint(out / "last.pt").build_deploy_model()
    again = replica_fingerprint(saved, 32)
    assert torch.allclose(torch.tensor(again["logits"]), torch.tensor(r0["logits"]), atol=1e-5)
    assert len(json.loads((out / "history.json").read_text())) == epochs_done
    # only rank 0 wrote: one best.pt and one last.pt, no per-rank copies or leftovers
    assert sorted(p.name for p in out.rglob("*.pt")) == ["best.pt", "last.pt"]
    assert not list(out.rglob("*.partial*"))
    return config


def test_torchrun_two_gloo_processes_and_resume(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", per_class=8, size=32, seed=2)
    out = tmp_path / "run"
    _torchrun(["--data", str(data), "--out", str(out), "--epochs", "2", "--stop-after", "1",
               "--batch-size", "8", "--input-size", "32", "--workers", "0", "--weights", "none"], tmp_path)
    assert _check_in_sync(out, 1)["status"] == "interrupted"
    _torchrun(["--out", str(out), "--resume"], tmp_path)
    config = _check_in_sync(out, 2)
    assert config["status"] == "finished" and (out / "report" / "report.md").is_file()
    assert load_checkpoint(out / "best.pt").meta["train_config"]["batch_size"] == 8


TINY_RUN = ["--epochs", "1", "--batch-size", "8", "--input-size", "32", "--workers", "0", "--weights", "none",
            "--no-report"]


def test_a_failing_or_hanging_rank_ends_the_job(tmp_path):
    """A rank that raises ends the job with its error; a rank that hangs (the case that held every process
    for PyTorch's 30-minute Gloo default) ends it after --dist-timeout, with an error line on rank 0."""
    data = make_synthetic_dataset(tmp_path / "data", per_class=8, size=32, seed=2)
    t0 = time.monotonic()
    r = _torchrun(["--data", str(data), "--out", str(tmp_path / "raise"), *TINY_RUN], tmp_path, fault="raise",
                  expect_ok=False, timeout=120)
    assert "injected failure on rank 1" in r.stdout + r.stderr
    t1 = time.monotonic()
    r = _torchrun(["--data", str(data), "--out", str(tmp_path / "hang"), *TINY_RUN, "--dist-timeout", "10"],
                  tmp_path, fault="hang", expect_ok=False, timeout=180)
    assert "error: rank 0: a collective with the other processes failed" in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - t1 < 150 and t1 - t0 < 110


def test_rank_0_reads_the_data_for_every_rank(tmp_path):
    """Rank 1 cannot decode a single image, yet trains: the index comes from rank 0. A bad image makes
    every rank end with rank 0's error, not a hang."""
    data = make_synthetic_dataset(tmp_path / "data", per_class=8, size=32, seed=2)
    out = tmp_path / "run"
    _torchrun(["--data", str(data), "--out", str(out), *TINY_RUN], tmp_path, fault="cannot_decode")
    assert json.loads((out / "config.json").read_text())["ddp_check"]["replicas_in_sync"] is True
    (data / "Normal" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = _torchrun(["--data", str(data), "--out", str(tmp_path / "bad"), *TINY_RUN], tmp_path,
                  expect_ok=False, timeout=120)
    assert r.stderr.count("broken.png: unreadable image") == 2, r.stderr[-3000:]


def test_replicas_agree_on_weights_and_within_a_logit_tolerance():
    """Exact logit equality failed replicas on two GPU models that round differently; the weights decide."""
    a = {"state_sha256": "aa", "logits": [[1.0, 2.0]]}
    close = {"state_sha256": "aa", "logits": [[1.0 + 1e-6, 2.0]]}
    assert replicas_agree([a, close])["replicas_in_sync"] is True
    assert replicas_agree([a, {**close, "state_sha256": "bb"}])["replicas_in_sync"] is False
    far = replicas_agree([a, {"state_sha256": "aa", "logits": [[1.5, 2.0]]}])
    assert far["replicas_in_sync"] is False and far["max_logit_diff"] == pytest.approx(0.5)


def test_per_position_augmentation_seeds_differ_between_ranks_and_epochs():
    def seeds(rank, world, epoch):
        s = EpochSampler(10, _ctx(rank, world), seed=1, with_seeds=True)
        s.set_epoch(epoch)
        return list(s)

    r0, r1 = seeds(0, 2, 0), seeds(1, 2, 0)
    assert {i for i, _ in r0} | {i for i, _ in r1} == set(range(10))
    assert not {s for _, s in r0} & {s for _, s in r1}  # no two ranks share an augmentation stream
    assert seeds(0, 2, 0) == r0 and {s for _, s in seeds(0, 2, 1)}.isdisjoint({s for _, s in r0})
    assert [i for i, _ in r0] == list(EpochSampler(10, _ctx(0, 2), seed=1))  # same order as without seeds
