"""Build folders that appear whole or not at all.

``atomic_folder(out, marker)`` yields a fresh temporary folder next to ``out``; when the block
finishes it replaces ``out`` in one rename, and on any error it is removed. An existing ``out`` is
replaced only if it is empty or holds ``marker`` (so a mistyped ``--out`` never deletes a user's folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from m3vit.errors import UsageError


@contextlib.contextmanager
def atomic_folder(out: str | Path, marker: str, what: str = "m3vit build") -> Iterator[Path]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not (out / marker).exists():
        raise UsageError(f"{out} exists and is not an {what} folder (no {marker}); choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise UsageError(f"cannot create the output folder next to {out}: {exc.strerror or exc}") from None
    try:
        yield work
        os.chmod(work, 0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        work.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
