"""The GPU training path in one short run: what the CPU test suite cannot show.

    python -m benchmarks.gpu_check --out runs/gpu_check            # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --device cpu --size 32 --out /tmp/dry   # the same steps on the CPU

On generated (SYNTHETIC) images at --size pixels, in order:
1. a run started on the CPU for one epoch, resumed on --device for the second (the loss scaler of a CPU
   run is empty; this used to crash an fp16 CUDA resume);
2. one epoch with mixed precision (`--amp auto`: bf16 where the GPU supports it, else fp16 + scaler);
3. a 1-process torchrun run (NCCL on a GPU, Gloo on the CPU) with its replica check;
4. the same epoch on the CPU, for the images/s ratio.
Figures are throughput on generated data, not accuracy: nothing here verifies a model.
Writes gpu_check.json and gpu_check.md under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe, machine_info
from train.atomic import check_writable_dir, write_json, write_text
from train.errors import cli_errors

REPO = Path(__file__).resolve().parents[1]


def _train(data: Path, out: Path, device: str, size: int, **kw: Any) -> dict[str, Any]:
    from train.loop import train_model

    train_model(data, out, device=device, input_size=size, batch_size=kw.pop("batch_size", 32), weights="none",
                workers=kw.pop("workers", None), progress=False, evaluate=False, **kw)
    return json.loads((out / "config.json").read_text())


def _torchrun_one_process(data: Path, out: Path, device: str, size: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
           "--data", str(data), "--out", str(out), "--device", device, "--epochs", "1", "--input-size", str(size),
           "--weights", "none", "--no-report", "--no-progress"]
    r = subprocess.run(cmd, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"error: the 1-process torchrun run failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "config.json").read_text())


def run(device: str, size: int, per_class: int, out: Path) -> dict[str, Any]:
    from train.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(out / "data", per_class=per_class, size=size, seed=0)
    steps: dict[str, Any] = {}
    _train(data, out / "resume", "cpu", size, epochs=2, stop_after=1)
    resumed = _train(data, out / "resume", device, size, epochs=2, resume=True)
    steps["resume_cpu_to_" + device] = {"status": resumed["status"], "device": resumed["device"]}
    amp = _train(data, out / "amp", device, size, epochs=1)
    dist = _torchrun_one_process(data, out / "torchrun", device, size)
    steps["torchrun_1_process"] = {"backend": dist["ddp_check"]["backend"],
                                   "replicas_in_sync": dist["ddp_check"]["replicas_in_sync"]}
    if device != "cpu":
        _train(data, out / "cpu", "cpu", size, epochs=1, amp="off")
    speed = {"device": amp["device"], "amp": str(_amp_name(amp)), "images_per_s":
             json.loads((out / "amp" / "history.json").read_text())[0]["images_per_s"],
             "cpu_images_per_s": json.loads(((out / ("amp" if device == "cpu" else "cpu")) / "history.json")
                                            .read_text())[0]["images_per_s"]}
    speed["ratio_over_cpu"] = round(speed["images_per_s"] / speed["cpu_images_per_s"], 2)
    steps["amp_epoch"] = speed
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"cpu": describe(machine_info()), "gpu": gpu, "torch": torch.__version__, "size": size, "per_class": per_class,
            "images": "SYNTHETIC (generated)", "steps": steps}


def _amp_name(config: dict[str, Any]) -> str:
    from train.recipe import amp_dtype

    dtype = amp_dtype(config["train_config"]["amp"], torch.device(config["device"]))
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def render(result: dict[str, Any]) -> str:
    s, a = result["steps"], result["steps"]["amp_epoch"]
    resume_key = next(k for k in s if k.startswith("resume"))
    return "\n".join([
        f"# GPU training check ({result['images']} images at {result['size']} px)", "",
        f"GPU: {result['gpu'] or 'none (dry run)'}; CPU: {result['cpu']}; torch {result['torch']}", "",
        "| step | result |", "|---|---|",
        f"| {resume_key.replace('_', ' ')} | {s[resume_key]['status']} on {s[resume_key]['device']} |",
        f"| 1-process torchrun | backend {s['torchrun_1_process']['backend']}, replicas in sync: "
        f"{s['torchrun_1_process']['replicas_in_sync']} |",
        f"| one epoch, {a['amp']} on {a['device']} | {a['images_per_s']:.1f} images/s |",
        f"| same epoch, fp32 on the CPU | {a['cpu_images_per_s']:.1f} images/s ({a['ratio_over_cpu']}x) |", ""])


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda; cpu = dry run")
    p.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    p.add_argument("--per-class", type=int, default=64, help="generated images per class (default 64)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs and the report")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible; run this on a GPU machine, or pass --device cpu "
              "for a dry run of the same steps", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty; pass a new folder", file=sys.stderr)
        return 2
    check_writable_dir(out)
    result = run(a.device, a.size, a.per_class, out)
    write_json(out / "gpu_check.json", result)
    write_text(out / "gpu_check.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
