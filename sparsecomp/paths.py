"""Output paths checked before any work: a compile or a sparsify run of minutes must not end in
an error about where its result was to go (`export_onnx`, `sparsify -o`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparsecomp.errors import SparsecompError

__all__ = ["writable_file"]


def writable_file(path, what: str, *, error: type[SparsecompError] = SparsecompError, example: str = "out.file") -> Path:
    """`path` as a Path, or `error` naming `what` (e.g. "-o/--output") if a file cannot be
    written there: a directory, a missing or non-directory parent, read-only, or a directory
    where creating a file fails although the permissions allow it (root on /proc, a read-only
    mount: the check tries it)."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {str(p)!r} is a directory", hint=f"give a file name, e.g. {example}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise error(f"{what}: cannot write {str(p)!r}: directory {str(parent)!r} does not exist",
                    hint="create it first, or choose another path")
    if not parent.is_dir():
        raise error(f"{what}: cannot write {str(p)!r}: {str(parent)!r} is not a directory")
    file_ro = p.exists() and not os.access(p, os.W_OK)
    if file_ro or not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what}: cannot write {str(p)!r}: {'the file' if file_ro else 'its directory'} is read-only",
                    hint="choose a writable location")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".sparsecomp-", suffix=".tmp"):
            pass
    except OSError as err:
        raise error(f"{what}: cannot write {str(p)!r}: creating a file in {str(parent)!r} failed ({err.strerror or err})",
                    hint="choose a writable location") from None
    return p
