"""Named fault points for fault-injection tests: the trainer and the atomic file writer call
:func:`point` at each step of the checkpoint and write-up sequence. A point does nothing unless the
environment variable ``CURE_FAST_FAULT`` names it:

    CURE_FAST_FAULT="tmp:checkpoint.pt@2"          # SIGKILL at the second time the point is reached
    CURE_FAST_FAULT="trained@1=SIGINT"             # send SIGINT instead

Points: ``trained`` (an epoch trained), ``evaluated`` (its evaluation done), and for every file the
run writes ``before:NAME`` (nothing of it written yet), ``tmp:NAME`` (the temporary copy complete,
not yet renamed over NAME), ``after:NAME`` (NAME in place).
"""
from __future__ import annotations

import collections
import os
import signal

ENV = "CURE_FAST_FAULT"
_hits: collections.Counter = collections.Counter()


def point(name: str) -> None:
    """Reach fault point ``name``: send the configured signal to this process when ``CURE_FAST_FAULT``
    names it and this is the configured hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, signame = spec.partition("=")
    target, _, count = target.partition("@")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, signame or "SIGKILL"))
