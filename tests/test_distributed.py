"""DistributedDataParallel under torchrun: 2 Gloo processes on the CPU, plus the sampler's sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_checkpoint
from train.distributed import DistContext, EpochSampler, replica_fingerprint
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


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "train", *args, "--no-progress"]
    # Own process group, so a hung launch is killed with its ranks instead of outliving the test.
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 600 s:\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _check_in_sync(out: Path, epochs_done: int) -> dict:
    config = json.loads((out / "config.json").read_text())
    check = config["ddp_check"]
    assert config["world_size"] == 2 and check["backend"] == "gloo" and check["world_size"] == 2
    r0, r1 = check["per_rank"]
    assert r0["state_sha256"] == r1["state_sha256"] and r0["logits"] == r1["logits"]
    assert check["replicas_in_sync"] is True
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
