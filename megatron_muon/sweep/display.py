"""Progress bar and live table of the trials being driven (rich), for a terminal watching a sweep."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from megatron_muon.sweep.store import Trial

STATUS_STYLE = {"done": "green", "diverged": "yellow", "failed": "red", "running": "cyan", "pending": "dim"}


class LiveDisplay:
    """Shows the trials of the current stage: counts, a bar, and the running and best trials."""

    def __init__(self, columns: Sequence[str], objective: str = "final", rows: int = 16, console: Console | None = None):
        self.columns = list(columns)
        self.objective = objective
        self.rows = rows
        self.console = console or Console()
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._started = time.monotonic()

    def __enter__(self):
        self._live.start()
        return self

    def __exit__(self, *exc):
        self._live.stop()
        self.console.line()

    def update(self, title: str, trials: Sequence[Trial]) -> None:
        self._live.update(self.render(title, trials), refresh=True)

    def render(self, title: str, trials: Sequence[Trial]):
        counts = Counter(t.status for t in trials)
        finished = counts["done"] + counts["diverged"]
        header = Text.assemble(
            (f"{title}  ", "bold"),
            f"{finished}/{len(trials)} finished  ",
            *((f"{counts[s]} {s}  ", STATUS_STYLE[s]) for s in ("running", "pending", "diverged", "failed") if counts[s]),
            f"{time.monotonic() - self._started:.0f}s",
        )
        bar = ProgressBar(total=max(1, len(trials)), completed=finished, width=60)
        table = Table(show_edge=False, pad_edge=False)
        for name in (*self.columns, "status", "attempts", f"{self.objective} loss", "wall s"):
            table.add_column(name, justify="right")
        for t in self._interesting(trials):
            loss = t.objective(self.objective)
            table.add_row(
                *(f"{t.params.get(c, ''):.4g}" if isinstance(t.params.get(c), float) else str(t.params.get(c, ""))
                  for c in self.columns),
                Text(t.status, STATUS_STYLE[t.status]), str(t.attempts),
                f"{loss:.4f}" if t.finished and math.isfinite(loss) else "",
                f"{t.wall_s:.1f}" if t.wall_s is not None else "",
            )
        return Group(header, bar, table)

    def _interesting(self, trials: Sequence[Trial]) -> list[Trial]:
        """Running and failed trials first, then the best finished ones, within `rows`."""
        running = [t for t in trials if t.status in ("running", "failed")]
        best = sorted((t for t in trials if t.finished), key=lambda t: t.objective(self.objective))
        return (running + best)[: self.rows]
