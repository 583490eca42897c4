"""One base class for every error a user can fix, and the one wrapper every command line goes through.

A `ToolkitError` means bad input (a file, a flag, a checkpoint, data): the command prints one
`error: ...` line that names what to change and exits 2. Any other exception is a bug in the toolkit
and keeps its traceback (exit 1), so the two are never confused.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int])


class ToolkitError(Exception):
    """Input the toolkit cannot use as given; the message names the file or flag and says what to do."""


def cli_errors(main: F) -> F:
    """Decorate a command's `main(argv) -> int`: a ToolkitError becomes `error: ...` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ToolkitError as err:
            _close_progress_bars()
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper  # type: ignore[return-value]


def _close_progress_bars() -> None:
    """A tqdm bar the failure left open would put the error after its text on the same line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
