"""ExitHistogram: the exits that reached userspace beside what KVM handled on its own."""
from __future__ import annotations

import ipywidgets as widgets

from .base import ExitLogView, escape

REDRAW_INTERVAL = 0.2   # seconds between live redraws while the guest runs
BAR_COLOR = "#4c72b0"
BAR_WIDTH = "160px"     # the longest bar; the others to scale
TEXT = "font-size:12px;line-height:16px"
CELL = "padding:0 4px;white-space:nowrap"


def bar_chart(counts: dict[str, int], title: str) -> str:
    """Bars on a linear scale, each count printed beside its bar: counts span 1 to millions
    (KVM emulating one instruction at a time counts each), so a log scale would make 375,795
    against 52 look like 2.4:1. A nonzero count keeps a 1 px sliver."""
    top = max(counts.values(), default=0)
    rows = "".join(
        f"<tr data-exit='{escape(name)}'><td style='{CELL};text-align:right'>{escape(name)}</td>"
        f"<td style='{CELL};width:{BAR_WIDTH}'><div style='background:{BAR_COLOR};height:11px;"
        f"min-width:1px;width:{100 * count / top:.2f}%'></div></td>"
        f"<td style='{CELL};text-align:right'>{count:,}</td></tr>"
        for name, count in counts.items())
    return (f"<table style='border-collapse:collapse;{TEXT}'><caption style='font-weight:bold;"
            f"text-align:left'>{escape(title)}</caption>"
            + (rows or f"<tr><td style='{CELL};color:#777'>nothing yet</td></tr>") + "</table>")


class ExitHistogram(ExitLogView):
    """Two bar charts in HTML: userspace exits by reason (ExitLog.histogram) and KVM's
    counters for the vCPU from the binary stats fd (the run loop's KERNEL_COUNTERS). While
    the guest runs it redraws at most every `interval` seconds (the views' poller, which costs
    the run nothing per exit); the end of every run or step redraws at once."""

    def __init__(self, lab, vcpu: int = 0, interval: float = REDRAW_INTERVAL, live: bool = True):
        super().__init__(lab, vcpu, interval, live)
        self.html = widgets.HTML()
        self.children = (self.caption, self.html)
        self.redraws = 0
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
            self.html.value = (
                "<div class='vlab-histogram' style='display:flex;flex-wrap:wrap;"
                "gap:4px 24px;align-items:flex-start'>"
                + bar_chart(user, f"userspace exits: {sum(user.values()):,}")
                + bar_chart(kernel, "KVM's own counters (stats fd)")
                + f"</div><div style='color:#777;{TEXT}'>bar lengths to scale (linear) "
                "within each chart</div>")
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
