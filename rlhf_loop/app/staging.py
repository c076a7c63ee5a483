"""A directory written whole or not at all: `rlhf model import` and `rlhf export` write their output this way."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to write into. When the block ends without an error it is renamed to
    `out` (which must be absent or empty: the callers check first), so `out` holds the whole result or
    nothing; on an error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        if out.exists():
            out.rmdir()  # empty: rename needs the name free
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
