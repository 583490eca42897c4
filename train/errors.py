"""One base class for every error a user can fix, and the one wrapper every command line goes through.

A `ToolkitError` means bad input (a file, a flag, a checkpoint, data): the command prints one
`error: ...` line that names what to change and exits 2. Any other exception is a bug in the toolkit
and keeps its traceback (exit 1), so the two are never confused. Ctrl-C, and SIGTERM or SIGHUP (`kill`,
`timeout`, `docker stop`, a closed terminal), interrupt a command the same way: its `finally` blocks remove
half-written files and stop servers and worker processes, then it prints `interrupted` and exits 130.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C
TERMINATION_SIGNALS = ("SIGTERM", "SIGHUP")

F = TypeVar("F", bound=Callable[..., int])


class ToolkitError(Exception):
    """Input the toolkit cannot use as given; the message names the file or flag and says what to do."""


def cli_errors(main: F) -> F:
    """Decorate a command's `main(argv) -> int`: a ToolkitError becomes `error: ...` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            with interrupt_on_termination():
                return main(*args, **kwargs)
        except ToolkitError as err:
            _close_progress_bars()
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            _close_progress_bars()
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_termination_signals() -> dict[int, Any]:
    """From now on SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so `finally` blocks run
    (without this they end the process on the spot). A signal that is ignored (`nohup`) or already handled
    is left as it is. Returns the handlers replaced. Main thread only, where Python runs signal handlers."""
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for name in TERMINATION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, _interrupt)
    return replaced


@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """interrupt_on_termination_signals() for the duration of a command; the old handlers come back after."""
    replaced = interrupt_on_termination_signals()
    try:
        yield
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


def _close_progress_bars() -> None:
    """A tqdm bar the failure left open would put the error after its text on the same line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
