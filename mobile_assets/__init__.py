"""The Flutter asset bundle's source files: its manifest schema and the app developers' guide.

`python -m export.lite` writes the generated bundle (models, labels.txt, manifest.json, test_vectors/) into
this folder by default; only this file, manifest.schema.json and README.md are source.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from train.errors import ToolkitError

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "manifest.schema.json"
APP_README_PATH = HERE / "README.md"


class ManifestValidationError(ToolkitError, ValueError):
    """A bundle manifest that does not follow manifest.schema.json."""


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise ManifestValidationError naming every field that breaks the schema."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors[:10]]
        raise ManifestValidationError(f"bundle manifest breaks {SCHEMA_PATH.name}:\n  " + "\n  ".join(lines))
