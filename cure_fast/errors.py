"""The errors a user can meet, and how the command line reports them: one line on stderr naming what
is wrong and what is allowed, no traceback, and an exit status that says what kind of failure it was.

    with one_line_errors("cure-fast train"):
        run(args)

Exit status: 2 for a bad value (``ConfigError``: a config key, a command-line argument, a YAML
file), 1 for a file or a fault (``CheckpointError``, ``DiskFullError``, ``TrainingError``, any other
``ValueError`` or ``OSError``), 128 + the signal number for an interrupted run (130 for Ctrl-C, 143
for SIGTERM).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class ConfigError(ValueError):
    """A bad value given by the user: the message names the key (or argument, or file) and what is allowed."""


class CheckpointError(ValueError):
    """A file that cannot serve as the checkpoint or model asked for: the message names the file and what it holds."""


class DiskFullError(OSError):
    """No space left while writing a file; the file written before (if any) is intact and no temporary file is left."""


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN/Inf loss); the message names the last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``str()`` says what was saved and how to resume."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def message(self) -> str:
        return str(self.args[0])


class SignalGuard:
    """SIGINT and SIGTERM raise :class:`Interrupted` (carrying ``describe()``'s one line) in the main
    thread, except inside :meth:`critical` sections, where they wait for the section's end so that a
    checkpoint and its metrics are written together. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, describe):
        self.describe, self.pending, self.depth, self.previous = describe, None, 0, {}

    def _handle(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise Interrupted(signum, self.describe(signum))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum, self.describe(signum))


def one_line(message: object) -> str:
    """``message`` on one line: its lines joined with "; " (YAML and torch messages span several)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def exit_status(error: BaseException) -> int:
    """The exit status for ``error`` (see the module docstring)."""
    if isinstance(error, Interrupted):
        return 128 + error.signum
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 2 if isinstance(error, ConfigError) else 1


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn the expected errors of a command into one line ``PROG: message`` on stderr and an exit
    status; anything else (a bug) keeps its traceback."""
    try:
        yield
    except (ValueError, OSError, TrainingError, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            message = "interrupted (Ctrl-C)"
        elif isinstance(error, OSError) and not isinstance(error, DiskFullError) and error.filename:
            message = f"{error.strerror or error}: {error.filename}"
        else:
            message = str(error) or type(error).__name__
        print(f"{prog}: {one_line(message)}", file=sys.stderr, flush=True)
        raise SystemExit(exit_status(error)) from None
