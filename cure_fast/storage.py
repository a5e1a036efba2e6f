"""Files written whole or not at all: every file a run or a report writes goes through
:func:`write_atomic` (a temporary copy, flushed to disk, then renamed over the target), so a kill at
any moment leaves either the previous file or the new one, and a full disk is one clear error.

>>> save_torch(state, "runs/x/checkpoint.pt")
>>> save_figure(fig, "runs/x/curves.png")
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
from typing import Any, Iterator, Union

from . import faults
from .errors import DiskFullError

CHUNK = 1 << 20
TMP_SUFFIX = ".tmp"


def numbered_paths(folder: str, name: str, suffix: str = "") -> Iterator[str]:
    """``folder/NAME SUFFIX``, then ``folder/NAME-run2 SUFFIX``, ``-run3``, ...: the candidates for a new run
    folder or report (``-runK``, not ``-K``: run names end in numbers, ``mnist-demo-2`` is the l2 demo)."""
    yield os.path.join(folder, name + suffix)
    k = 2
    while True:
        yield os.path.join(folder, f"{name}-run{k}{suffix}")
        k += 1


def write_chunk(f, chunk) -> None:
    """Write one chunk: the single place where bytes reach the file (fault-injection tests replace it
    to simulate a full disk)."""
    f.write(chunk)


def write_atomic(path: str, data: Union[bytes, bytearray, memoryview, str]) -> None:
    """Write ``data`` to ``path`` atomically. Out of space: :class:`DiskFullError` ("no space left on
    device while writing PATH"), the temporary copy removed and the previous ``path`` intact."""
    name = os.path.basename(path)
    faults.point(f"before:{name}")
    view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            for start in range(0, len(view), CHUNK):
                write_chunk(f, view[start:start + CHUNK])
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"tmp:{name}")
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous copy is intact" if os.path.exists(path) else "nothing was written"
            full = DiskFullError(f"no space left on device while writing {path} ({kept}, no temporary file left)")
            full.errno, full.path = errno.ENOSPC, path
            raise full from None
        if isinstance(error, OSError) and error.filename is None:  # e.g. EFBIG from write(): name the file
            raise OSError(error.errno, f"{error.strerror or error} while writing", path) from None
        raise
    faults.point(f"after:{name}")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (serialized in memory first, so that a full disk
    is an ``OSError`` with its errno rather than a serializer error)."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


def save_figure(fig, path: str, **kwargs) -> None:
    """A matplotlib figure to ``path`` atomically; the format is the extension's."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or "png", **kwargs)
    write_atomic(path, buffer.getbuffer())


def write_json(obj: Any, path: str) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def remove_temporaries(folder: str) -> None:
    """Remove the temporary copies a killed writer left in ``folder``."""
    for path in glob.glob(os.path.join(glob.escape(folder), "*" + TMP_SUFFIX)):
        with contextlib.suppress(OSError):
            os.remove(path)
