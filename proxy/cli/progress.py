"""Progress of a long command: a rich bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.progress import Progress as Bar

from proxy.units import format_size


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.console = Console(file=stream, highlight=False, markup=False, soft_wrap=True)
        self.bar = (
            Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            if stream.isatty()
            else None
        )

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def line(self, text: str) -> None:
        """A line that stays (above the bar on a terminal)."""
        self.console.print(text)

    def task(self, label: str, total: int | None) -> Task:
        return Task(self, label, total)


class Task:
    """One image or one pass: bytes on the bar, or a line per item and one at the end."""

    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self._progress = progress
        self._id: TaskID | None = None
        if progress.bar is not None:
            self._id = progress.bar.add_task(label, total=total)
        else:
            progress.line(f"{label}: {format_size(total)}" if total else f"{label}: started")

    def advance(self, count: int) -> None:
        if self._progress.bar is not None and self._id is not None:
            self._progress.bar.advance(self._id, count)

    def item(self, text: str) -> None:
        """One piece done: a line in logs, nothing on a terminal (the bar shows it)."""
        if self._progress.bar is None:
            self._progress.line(f"  {text}")

    def finish(self, text: str) -> None:
        if self._progress.bar is not None and self._id is not None:
            self._progress.bar.remove_task(self._id)
        self._progress.line(text)
