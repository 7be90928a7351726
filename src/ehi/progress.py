"""Progress reporting: bars on a terminal, one plain line per long phase everywhere else.

A redirected log filled with carriage-return redraws is unreadable, and ``--no-progress``
(``EHI_NO_PROGRESS=1``) must not leave a long command silent: so bars are drawn only when
wanted, not silenced and stderr is a terminal, and a long step always says when it starts.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager

from tqdm.auto import tqdm

LONG = 256  # texts or steps below this are quick: no bar, no phase line


def quiet() -> bool:
    """Bars silenced for the command (``--no-progress`` sets ``EHI_NO_PROGRESS=1``)."""
    return os.environ.get("EHI_NO_PROGRESS", "") not in ("", "0")


def bars(wanted: bool = True) -> bool:
    """Whether to draw a progress bar."""
    return bool(wanted) and not quiet() and sys.stderr.isatty()


def phase(message: str) -> None:
    """Say that a long step starts: a line of its own, shown at once (on stderr, so that
    stdout keeps only results)."""
    tqdm.write(f"[ehi] {message}", file=sys.stderr)
    sys.stderr.flush()



@contextmanager
def filtered_stderr(noise: re.Pattern):
    """Lines that third-party C++ writes straight to file descriptor 2 and that match
    ``noise`` are dropped; the rest is printed once the block ends. Yields a stream on the
    real stderr, for what must show meanwhile (a bar)."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real descriptor (some notebooks): leave it
        yield sys.stderr
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp, os.fdopen(os.dup(saved), "w", buffering=1) as real:
        os.dup2(tmp.fileno(), fd)
        try:
            yield real
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode("utf-8", "replace").splitlines() if not noise.search(ln)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
