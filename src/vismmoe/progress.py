"""Progress display for long work (rich), silent when stderr is not a terminal or VISMMOE_QUIET is set."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def layer_progress(label: str, total: int | None = None):
    """Yields `tick()`; each call advances one step (e.g. one MoE layer read)."""
    if os.environ.get("VISMMOE_QUIET") or not sys.stderr.isatty():
        yield lambda: None
        return
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed} layers"), TimeElapsedColumn(),
                  transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda: prog.advance(task)


def status(msg: str) -> None:
    """One line of progress on stderr (e.g. compiling and capturing the fast decode step), silent off a terminal
    or with VISMMOE_QUIET."""
    if os.environ.get("VISMMOE_QUIET") or not sys.stderr.isatty():
        return
    print(msg, file=sys.stderr, flush=True)
