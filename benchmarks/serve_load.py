"""`python -m benchmarks.serve_load`: requests/s and p50/p99 latency of a local TorchServe under load.

Starts TorchServe on the config `python -m export.mar` wrote (127.0.0.1 only, token authorization on),
waits for the model's worker, sends N predictions from C concurrent clients, checks every answer, stops
the server, and prints (and optionally writes) the figures. The same `load_test` drives the concurrent
part of tests/test_torchserve.py. Figures depend on what else the CPU is doing; say so when quoting them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from export.serve import TorchServe, ServeError, check_available, wait_ready
from train.atomic import check_writable_file, write_json
from train.errors import cli_errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_test(server: TorchServe, model: str, payloads: list[bytes], *, n_requests: int = 104,
              clients: int = 8) -> dict[str, Any]:
    """`n_requests` predictions from `clients` threads, payloads cycled in order. Returns the figures and
    `results`: (request index, HTTP status, JSON body, seconds) per request."""
    token = server.keys()["inference"]

    def one(i: int) -> tuple[int, int, Any, float]:
        t0 = time.perf_counter()
        status, body = server.predict(model, payloads[i % len(payloads)], token=token, timeout=120)
        return i, status, body, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat_ms = np.array([r[3] for r in results]) * 1000
    return {"n_requests": n_requests, "clients": clients, "wall_s": round(wall, 3),
            "requests_per_s": round(n_requests / wall, 2), "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "ok": sum(r[1] == 200 for r in results),
            "results": results}


def image_payloads(images: Path | None, n: int = 16, size: int = 224) -> tuple[list[bytes], str]:
    """Real files from `images`, else generated grayscale PNG/JPEG (labelled as generated)."""
    if images is not None:
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise ServeError(f"--images {images}: no .png/.jpg/.jpeg files found")
        return [f.read_bytes() for f in files], f"{len(files)} images from {images}"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out, f"{n} GENERATED {size}x{size} grayscale PNG/JPEG images"


def run_serve_load(model_store: Path, *, config: Path | None = None, model: str = "cxr_resnet18",
                   n_requests: int = 200, clients: int = 8, images: Path | None = None) -> dict[str, Any]:
    """Start, wait for the worker, load-test, stop; the figures plus what was measured."""
    payloads, source = image_payloads(images)
    server = TorchServe(model_store, config or model_store / "config.properties")
    try:
        server.start()
        wait_ready(server, model)
        load_test(server, model, payloads[:4], n_requests=8, clients=2)  # warm-up, not measured
        stats = load_test(server, model, payloads, n_requests=n_requests, clients=clients)
    finally:
        leftovers = server.stop()
    stats.pop("results")
    stats.update(images=source, model=model, killed_after_stop=leftovers,
                 note="latency includes HTTP, queueing and server-side batching; CPU shared with other work")
    return stats


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", type=Path, default=Path("artifacts"),
                   help="folder holding cxr_resnet18.mar and the config.properties export.mar wrote")
    p.add_argument("--config", type=Path, default=None, help="config.properties (default: MODEL_STORE/config.properties)")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of PNG/JPEG images to send (default: generated 224x224 images)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    config = args.config or args.model_store / "config.properties"
    if not config.is_file():
        p.error(f"--config {config} does not exist; run `python -m export.mar --checkpoint CKPT --out "
                f"{args.model_store}` first")
    if args.requests < 1 or args.clients < 1:
        p.error("--requests and --clients must be at least 1")
    if args.out:
        check_writable_file(args.out)
    reason = check_available()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:  # Ctrl-C, kill or timeout: run_serve_load stops the server, cli_errors says "interrupted"
        stats = run_serve_load(args.model_store, config=config, n_requests=args.requests, clients=args.clients,
                               images=args.images)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    if args.out:
        write_json(args.out, stats)
    return 0 if stats["ok"] == stats["n_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
