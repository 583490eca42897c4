"""The package layers are a contract (pyproject.toml [tool.importlinter]), checked here as in CI's lint-imports:
an upward import or an import cycle inside a stage fails the test suite, not only a review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]  # lint-imports


def test_import_layers_and_no_cycles_hold():
    proc = subprocess.run([*LINT, "--config", str(REPO / "pyproject.toml")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    assert "2 kept, 0 broken" in report


def test_the_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a train module that imports export is reported as broken."""
    import shutil

    for pkg in ("train", "quantize", "export", "mobile_assets", "benchmarks"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "train" / "leak.py").write_text("from export.registry import FORMATS\n")
    proc = subprocess.run([*LINT, "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "train.leak -> export.registry" in proc.stdout + proc.stderr
