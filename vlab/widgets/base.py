"""What every view shares: a box over one Lab, lazy attachment to its models, and a text
summary (nbval compares text, never a widget's view).

A view is live by default: it follows the Lab and redraws as its models change, so after a
notebook's later cells it shows their state, not its own cell's. `live=False` makes a
snapshot: drawn once, as at the cell that made it. Each view says which it is in its caption.

A view may exist before the models it shows (a Dashboard made before `kvm_init`): it says
what is missing and attaches on a later `refresh()`, which the Dashboard calls after every
stepper action. Model callbacks may arrive on a vCPU thread, and while a guest runs the
`POLLER`'s thread redraws what changed, so views only read models and set widget values there.
"""
from __future__ import annotations

import html
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import ipywidgets as widgets

CHANGED_STYLE = "background:#ffe58f"
# An explicit line height: ipywidgets gives HTML widgets a button's (28 px) for every line.
MONO = "font-family:monospace;font-size:12px;line-height:16px"
TABLE_STYLE = f"border-collapse:collapse;{MONO}"
CELL_STYLE = "padding:1px 6px;text-align:left;border-bottom:1px solid #eee"
CAPTIONS = {True: "live: follows the lab", False: "as at this cell: does not follow the lab"}


def escape(value: object) -> str:
    return html.escape(str(value))


def cell(text: object, *, tag: str = "td", changed: bool = False, attrs: str = "") -> str:
    """One table cell; a changed one carries the class `vlab-changed` (tests and CSS find it)."""
    style = CELL_STYLE + (";" + CHANGED_STYLE if changed else "")
    klass = " class='vlab-changed'" if changed else ""
    return f"<{tag}{klass} style='{style}'{attrs}>{escape(text)}</{tag}>"


def table(rows: list[str], header: tuple[str, ...] = ()) -> str:
    head = "<tr>" + "".join(cell(h, tag="th") for h in header) + "</tr>" if header else ""
    return f"<table style='{TABLE_STYLE}'>{head}{''.join(rows)}</table>"


def message(text: str, kind: str = "info") -> str:
    """A one-line notice; errors in red so a refused click is not missed."""
    color = {"info": "#555", "error": "#b00020", "busy": "#0b5394"}[kind]
    return f"<div class='vlab-{kind}' style='color:{color};{MONO}'>{escape(text)}</div>"


class Poller:
    """Redraws live views while a guest runs, at no cost per VM exit: one daemon thread looks
    at every watched model's version (a cheap number: an exit log's total, the bytes the
    console took) every TICK seconds, and when it has moved calls the view's action, at
    most once per the watch's interval counted from the end of the last call (a draw slower
    than the interval, as on an emulated host, does not run back to back). A view thus costs
    a run its redraws, not a call per exit. The thread runs while something is watched."""

    TICK = 0.05

    def __init__(self):
        self._watches: list[_Watch] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, version: Callable[[], object], action: Callable[[], None],
              interval: float) -> Callable[[], None]:
        """Call `action()` after `version()` changes, at most every `interval` seconds;
        returns the function that stops watching."""
        watch = _Watch(version, action, interval, version())
        with self._lock:
            self._watches.append(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlab views", daemon=True)
                self._thread.start()
        return lambda: self._forget(watch)

    def _forget(self, watch: "_Watch") -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    def _loop(self) -> None:
        while True:
            time.sleep(self.TICK)
            with self._lock:
                watches = tuple(self._watches)
                if not watches:
                    self._thread = None
                    return
            now = time.monotonic()
            for watch in watches:
                if now < watch.due:
                    continue
                try:
                    seen = watch.version()
                    if seen == watch.seen:
                        continue
                    watch.seen = seen
                    watch.action()
                except Exception:   # one view's failure must not stop the others' redraws
                    traceback.print_exc()
                watch.due = time.monotonic() + watch.interval


@dataclass(eq=False)
class _Watch:
    version: Callable[[], object]
    action: Callable[[], None]
    interval: float
    seen: object
    due: float = 0.0


POLLER = Poller()


class LabView(widgets.VBox):
    """A view over one Lab. Subclasses implement `_attach` (subscribe to the models that
    exist now; True once done), `render` and `summary`, and put `caption` (live or as at
    this cell) above what they draw."""

    def __init__(self, lab, live: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.add_class(f"vlab-{type(self).__name__.lower()}")   # for CSS and browser tests
        self.lab = lab
        self.live = live
        self.caption = widgets.HTML(
            f"<div class='vlab-caption vlab-{'live' if live else 'snapshot'}' "
            f"style='color:#777;font-size:11px;line-height:14px'>{CAPTIONS[live]}</div>")
        self._detachers: list[Callable[[], None]] = []
        self._attached = False

    def refresh(self) -> None:
        """Attach to models that appeared since (stages done meanwhile; a live view only),
        then re-render."""
        if self.live and not self._attached:
            self._attached = bool(self._attach())
        self.render()

    def on_lab_event(self) -> None:
        """The Lab did something: a live view attaches to (and shows) the models it made. An
        attached view redraws when its models change, so a step draws it once, not once
        more here."""
        if self.live and not self._attached:
            self.refresh()

    def _attach(self) -> bool:
        return True

    def render(self) -> None:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def _on_registers(self, vcpu: int | None, callback: Callable[..., None]) -> bool:
        """Call `callback` whenever a vCPU's register model changes (after every step and at
        the end of every run); `vcpu=None` for all of them. False while there are none."""
        models = self.lab.registers if vcpu is None else self.lab.registers[vcpu:vcpu + 1]
        for model in models:
            self._detachers.append(model.subscribe(lambda model, **change: callback()))
        return bool(models)

    def _redraw_on(self, version: Callable[[], object], interval: float,
                   vcpu: int | None) -> bool:
        """Redraw when `version()` moves (the POLLER looks, at most every `interval`
        seconds) and when the registers change (a step or run ended). The poller skips a
        version a registers change drew already: a step draws the view once."""
        drawn = object()

        def draw() -> None:
            nonlocal drawn
            drawn = version()
            self.render()

        def draw_if_moved() -> None:
            if version() != drawn:
                draw()

        self._detachers.append(POLLER.watch(version, draw_if_moved, interval))
        return self._on_registers(vcpu, draw)

    def close(self) -> None:
        """Stop listening to the models and being polled (a closed view must not redraw)."""
        for detach in self._detachers:
            detach()
        self._detachers.clear()
        super().close()

    def __repr__(self) -> str:
        # The text/plain of the widget's output: short and stable, so nbval can compare it.
        return f"{type(self).__name__}()"


class ExitLogView(LabView):
    """A view over one vCPU's exit log: redrawn while exits arrive (at most every `interval`
    seconds, by the `POLLER`, which reads the log's total) and at once when a step or run
    ends. `render` holds `_lock`: the poller's thread and the kernel's may both draw."""

    def __init__(self, lab, vcpu: int, interval: float, live: bool = True, **kwargs):
        super().__init__(lab, live, **kwargs)
        self.vcpu = vcpu
        self.interval = interval
        self._lock = threading.Lock()

    @property
    def exit_log(self):
        return self.lab.exit_logs[self.vcpu] if len(self.lab.exit_logs) > self.vcpu else None

    def _attach(self) -> bool:
        log = self.exit_log
        if log is None:
            return False
        return self._redraw_on(lambda: log.total, self.interval, self.vcpu)
