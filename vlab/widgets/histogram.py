"""ExitHistogram: the exits that reached userspace beside what KVM handled on its own."""
from __future__ import annotations

import io
import math

import ipywidgets as widgets
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .base import ExitLogView

REDRAW_INTERVAL = 0.2   # seconds between live redraws while the guest runs
ROWS = 8                # bars per chart at most
MIN_ROWS = 4            # room kept for this many, so a few bars stay thin
BAR_LEFT, BAR_SPAN = 0.32, 0.55   # in axes coordinates: names left of BAR_LEFT, counts after
BAR_COLOR = "#4c72b0"


class BarChart:
    """One chart on tickless axes, its patches and texts made once and updated in place:
    axis ticks, title layout and new artists are most of a matplotlib redraw. Bars are on a
    log scale: counts span 1 to millions (KVM emulating one instruction at a time counts
    each)."""

    def __init__(self, axes):
        axes.set_axis_off()
        axes.set_xlim(0, 1)
        self.axes = axes
        self.title = axes.text(0.5, 1.0, "", ha="center", va="top", fontsize=10,
                               transform=axes.transAxes)
        self.empty = axes.text(0.5, 0.5, "nothing yet", ha="center", va="center",
                               transform=axes.transAxes)
        self.rows = [(axes.add_patch(Rectangle((BAR_LEFT, 0), 0, 0.7, color=BAR_COLOR)),
                      axes.text(BAR_LEFT - 0.01, 0, "", ha="right", va="center", fontsize=8),
                      axes.text(0, 0, "", va="center", fontsize=8)) for _ in range(ROWS)]

    def show(self, counts: dict[str, int], title: str) -> None:
        self.title.set_text(title)
        self.empty.set_visible(not counts)
        shown = list(counts.items())[:ROWS]
        top = math.log10(max(counts.values())) + 1 if counts else 1
        # Rows from the top down, under the title; room for MIN_ROWS keeps a few bars thin.
        self.axes.set_ylim(min(0, len(shown) - MIN_ROWS) - 0.5, len(shown) + 0.2)
        for i, (bar, label, value) in enumerate(self.rows):
            for artist in (bar, label, value):
                artist.set_visible(i < len(shown))
            if i < len(shown):
                name, count = shown[i]
                y = len(shown) - i - 1
                width = BAR_SPAN * (math.log10(count) + 1) / top
                bar.set_y(y - 0.35)
                bar.set_width(width)
                label.set_position((BAR_LEFT - 0.01, y))
                label.set_text(name)
                value.set_position((BAR_LEFT + width + 0.01, y))
                value.set_text(f"{count:,}")


class ExitHistogram(ExitLogView):
    """Two bar charts in one reused matplotlib figure, rendered to PNG in an Image widget:
    userspace exits by reason (ExitLog.histogram) and KVM's counters for the vCPU from the
    binary stats fd (the run loop's KERNEL_COUNTERS). While the guest runs it redraws at most
    every `interval` seconds (from the vCPU thread, or a timer for the last change); the end
    of every run or step redraws at once."""

    def __init__(self, lab, vcpu: int = 0, interval: float = REDRAW_INTERVAL):
        super().__init__(lab, vcpu, interval)
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.children = (self.image,)
        self.redraws = 0
        self._figure = Figure(figsize=(7.5, 2.2), dpi=80)
        self._user_chart, self._kernel_chart = map(BarChart, self._figure.subplots(1, 2))
        self._drawn: tuple | None = None
        self.refresh()

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(userspace exits by reason, KVM's nonzero counters for this vCPU). The counters
        are read from the stats fd (one pread) rather than summed over the log's records,
        which would cost a pass over up to 100,000 records per redraw."""
        log = self.exit_log
        if log is None:
            return {}, {}
        counters = self.lab.runners[self.vcpu].kernel_counters()
        kernel = {n: counters[n] for n in log.counter_names if counters.get(n)}
        return log.histogram(), kernel

    def render(self) -> None:
        with self._lock:
            user, kernel = self.counts()
            drawn = (tuple(user.items()), tuple(kernel.items()))
            if drawn == self._drawn:
                return
            self._user_chart.show(user, f"userspace exits: {sum(user.values()):,}")
            self._kernel_chart.show(kernel, "KVM's own counters (stats fd)")
            buffer = io.BytesIO()
            # Fast compression: a few kB more PNG (about 12 kB) for a few ms less.
            self._figure.savefig(buffer, format="png", pil_kwargs={"compress_level": 1})
            self.image.value = buffer.getvalue()
            self._drawn = drawn
            self.redraws += 1

    def summary(self) -> str:
        user, kernel = self.counts()
        text = f"{sum(user.values())} userspace exits: " + (
            ", ".join(f"{k} {v}" for k, v in user.items()) or "none yet")
        if kernel:
            text += "\nKVM's counters: " + ", ".join(f"{k} {v}" for k, v in kernel.items())
        return text

    def __repr__(self) -> str:
        return f"ExitHistogram(vcpu={self.vcpu})"
