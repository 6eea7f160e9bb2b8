"""Progress display: rich progress bars on stderr for every loop over items, and the one quiet switch.

``--quiet`` (the CLI's global flag, :func:`set_quiet`) or the environment variable ``GESTALT_XAI_QUIET`` turns every
bar off; stage options carry no quiet flag of their own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["ProgressBar", "progress", "progress_bar", "quiet", "set_quiet"]

_QUIET = False
T = TypeVar("T")


def set_quiet(quiet: bool) -> None:
    """Silence progress bars (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def quiet() -> bool:
    """Whether progress display is off (``--quiet`` or ``GESTALT_XAI_QUIET`` set)."""
    return _QUIET or bool(os.environ.get("GESTALT_XAI_QUIET"))


class ProgressBar:
    """Handle of a running progress bar: ``advance(n, status=…)``; does nothing when progress is off."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self._bar is None:
            return
        fields: dict[str, Any] = {"advance": n}
        if status is not None:
            fields["status"] = status
        self._bar.update(self._task, **fields)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, silent: bool = False) -> Iterator[ProgressBar]:
    """A rich progress bar on stderr with a free-text status column (e.g. live training metrics).

    Silent with ``--quiet``, ``GESTALT_XAI_QUIET`` or ``silent=True``.
    """
    if silent or quiet():
        yield ProgressBar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield ProgressBar(bar, bar.add_task(description, total=total, status=""))


def progress(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (none with ``--quiet``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress_bar(description, total) as bar:
        for item in iterable:
            yield item
            bar.advance()
