"""`python -m mobile_assets --artifacts artifacts/ --out DIR`: the Flutter asset bundle, built from artifacts.json
alone (the verified model files, the spec and the images they were verified on, all recorded there)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from export.registry import bundle_variants
from train.errors import cli_errors

RUNTIMES = tuple(dict.fromkeys(v.bundle for v in bundle_variants().values()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mobile_assets", description=__doc__)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="export folder holding artifacts.json (default artifacts/)")
    p.add_argument("--out", type=Path, default=Path("mobile_assets"), help="bundle folder (default mobile_assets/)")
    p.add_argument("--data", type=Path, help="labelled images whose val split scores the bundled models "
                                             "(default: the data recorded in artifacts.json)")
    p.add_argument("--metrics-size", type=int, help="val images the bundled models are scored on (default: all)")
    p.add_argument("--runtime", default="all", choices=("all", *RUNTIMES),
                   help="the Flutter runtime package the bundle is for: only the files it loads (default all: every "
                        "bundled runtime whose files were exported and verified)")
    p.add_argument("--test-vectors", type=int, default=3, help="test vectors in the bundle (default 3)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--model-name", help="model name in manifest.json (default cxr-resnet18-<N>class)")
    p.add_argument("--model-version", help="model version in manifest.json (default: checkpoint sha256 prefix)")
    p.add_argument("--check", type=Path, metavar="DIR",
                   help="check a bundle where it was copied (e.g. your app's assets/cxr/): manifest, every file's "
                        "sha256, and every model on its test vectors in its runtime here; writes nothing")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    from export.cli import check_sizes
    from mobile_assets.bundle import write_bundle

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.check is not None:
        from mobile_assets.check import check, render

        result = check(a.check)
        print(render(result))
        return 0 if result["ok"] else 1
    check_sizes(metrics_size=a.metrics_size, test_vectors=a.test_vectors)
    write_bundle(a.artifacts, a.out, data=a.data, force=a.force, test_vectors=a.test_vectors,
                 model_name=a.model_name, model_version=a.model_version, metrics_size=a.metrics_size,
                 runtime=None if a.runtime == "all" else a.runtime)
    print(f"Flutter bundle written to {a.out}/ (manifest.json, labels.txt, test_vectors/, README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
