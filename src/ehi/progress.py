"""Progress reporting: bars on a terminal, one plain line per long phase everywhere else.

A redirected log filled with carriage-return redraws is unreadable, and ``--no-progress``
(``EHI_NO_PROGRESS=1``) must not leave a long command silent: so bars are drawn only when
wanted, not silenced and stderr is a terminal, and a long step always says when it starts.
"""

from __future__ import annotations

import os
import sys

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

