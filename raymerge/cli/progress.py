"""The progress bar of a running sweep: a live bar on a terminal, a periodic line in job logs."""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from raymerge.cli.console import consoles


class RateColumn(ProgressColumn):
    """The sweep's merges per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} merges/s", style="cyan")


class ProgressBar:
    """Done/total, rate, ETA and each worker's rate while the sweep runs; on a terminal a live
    bar, elsewhere (job logs) a line every LOG_EVERY_S seconds."""

    LOG_EVERY_S = 15.0

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]merging"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[workers]}"),
            console=consoles.out,
            disable=not consoles.out.is_terminal,
        )
        self._task = None
        self._total = 0
        self._done = 0
        self._per_worker: dict[int, int] = {}
        self._started = self._last_log = time.monotonic()

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            consoles.out.print(f"Skipping {skipped} merges already done in the output.")
        self._total = total
        self._started = self._last_log = time.monotonic()
        self._task = self._progress.add_task("merge", total=total, workers="")

    def note(self, text: str) -> None:
        """A line about the run (a race's round), printed above the bar."""
        consoles.out.print(text)

    def advance(self, result) -> None:
        self._done += 1
        if result.worker is not None:
            self._per_worker[result.worker] = self._per_worker.get(result.worker, 0) + 1
        self._progress.update(self._task, advance=1, workers=self._worker_rates())
        if result.status == "failed":
            consoles.out.print(Text(f"merge {result.merge_id} failed: {result.error}", "red"))
        now = time.monotonic()
        if not consoles.out.is_terminal and now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            rate = self._done / (now - self._started)
            consoles.out.print(
                f"merged {self._done}/{self._total} ({rate:.1f}/s) {self._worker_rates()}"
            )

    def _worker_rates(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rates = [f"w{w} {n / elapsed:.1f}/s" for w, n in sorted(self._per_worker.items())]
        return " · ".join(rates[:8]) + (" …" if len(rates) > 8 else "")
