"""StageStepper: buttons that drive the Lab, and the record of what the last stage did."""
from __future__ import annotations

import threading
import time
from typing import Callable

import ipywidgets as widgets

from ..lab.records import StageRecord
from .base import LabView, escape, message

STATUS_MARK = {"done": "&#10003;", "next": "&#9654;", "waiting": ""}
STATUS_STYLE = {"done": "color:#2e7d32", "next": "font-weight:bold;color:#0b5394",
                "waiting": "color:#888"}


class StageStepper(LabView):
    """"next stage", "step", "run to next exit", "run" and "stop" for one Lab.

    Anything that runs the guest runs in a background thread, so the kernel keeps handling
    widget messages and "stop" (`lab.stop()`) can interrupt a guest that never exits on its
    own. Step and run are disabled until the guest can run (the stages before kvm_cpu_exec
    done). While it runs, the other buttons are disabled and clicks are refused with a message;
    "stop" also stops a run started elsewhere (a cell's thread). Once the Lab is closed,
    every button is disabled.
    `on_action(callback)` is called after every action, from the thread that finished it."""

    def __init__(self, lab, vcpu: int = 0):
        super().__init__(lab)
        self.vcpu = vcpu

        def button(description: str, tooltip: str, handler, **style) -> widgets.Button:
            b = widgets.Button(description=description, tooltip=tooltip, **style)
            b.on_click(lambda _: handler())
            return b

        self.next_button = button("next stage", "perform the next QEMU bring-up stage",
                                  self.next_stage)
        self.step_button = button("step", "execute one guest instruction", self.step)
        self.exit_button = button("run to next exit", "KVM_RUN until one exit reaches userspace",
                                  self.run_to_next_exit)
        self.run_button = button("run", "run until HLT, a fatal exit or a breakpoint", self.run)
        self.stop_button = button("stop", "interrupt the running guest", self.stop,
                                  disabled=True)
        self.buttons = (self.next_button, self.step_button, self.exit_button, self.run_button,
                        self.stop_button)
        self.stages_html = widgets.HTML()
        self.status = widgets.HTML()
        self.record_html = widgets.HTML()
        record_box = widgets.Box((self.record_html,), layout=widgets.Layout(
            max_height="240px", overflow="auto", border="1px solid #ddd"))
        self.children = (widgets.HBox(self.buttons), self.stages_html, self.status, record_box)
        self.status_text = ""
        self.running = False    # a background run is in progress
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._callbacks: list[Callable[[], None]] = []
        self.refresh()

    def on_lab_event(self) -> None:
        """Stage statuses and buttons follow the Lab itself: redraw on every event."""
        self.refresh()

    def on_action(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background run to end; True if none is left running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    # -- actions ------------------------------------------------------------------------------
    def _next_stage_name(self) -> str | None:
        return next((row["stage"] for row in self.lab.stages if row["status"] == "next"), None)

    def next_stage(self) -> None:
        if self._next_stage_name() == "kvm_cpu_exec":  # the first run (lab.run records it)
            self._background("kvm_cpu_exec", self.lab.run)
        else:
            self._now("next stage", self.lab.next_stage)

    def step(self) -> None:
        self._now("step", lambda: self.lab.step(self.vcpu))

    def run_to_next_exit(self) -> None:
        self._background("run to next exit", lambda: self.lab.run(max_exits=1))

    def run(self) -> None:
        self._background("run", self.lab.run)

    def stop(self) -> None:
        if not self.running and self.lab.busy is None:
            self._report("stop: the guest is not running", "info")
            return
        self.lab.stop("stopped from the stepper")

    # -- how actions run --------------------------------------------------------------------
    def _refused(self, what: str) -> bool:
        if self.running:
            self._report(f"{what} refused: the guest has been running for "
                         f"{time.monotonic() - self._started:.1f} s; press stop first", "error")
        return self.running

    def _now(self, what: str, action) -> None:
        if not self._refused(what):
            self._finish(what, action)

    def _background(self, what: str, action) -> None:
        if self._refused(what):
            return
        self._started = time.monotonic()
        self.running = True
        self._thread = threading.Thread(target=self._finish, args=(what, action),
                                        name=f"vlab stepper: {what}", daemon=True)
        self._report(f"{what}: the guest is running; stop interrupts it", "busy")
        self._set_buttons()
        self._thread.start()

    def _finish(self, what: str, action) -> None:
        try:
            result = action()
            text, kind = f"{what}: {_describe(result)}", "info"
        except Exception as e:  # shown to the learner, who clicked and expects an answer
            text, kind = f"{what} failed: {type(e).__name__}: {e}", "error"
        self.running = False
        self._report(text, kind)
        self.render()
        for callback in self._callbacks:
            callback()

    def _report(self, text: str, kind: str) -> None:
        self.status_text = text
        self.status.value = message(text, kind)

    def _set_buttons(self) -> None:
        """Each button is enabled only when a click can work: step and run once the guest
        can run (every stage before kvm_cpu_exec done), stop while a run is going. Stop is
        red only then, so a disabled one does not look like a live alarm."""
        rows = self.lab.stages
        done = all(row["status"] == "done" for row in rows)
        ready = all(row["status"] == "done" for row in rows if row["stage"] != "kvm_cpu_exec")
        for b in self.buttons:
            if self.lab.closed:
                b.disabled = True
            elif b is self.stop_button:
                b.disabled = not self.running
            elif b is self.next_button:
                b.disabled = self.running or done
            else:
                b.disabled = self.running or not ready
        self.stop_button.button_style = "" if self.stop_button.disabled else "danger"

    # -- view -------------------------------------------------------------------------------
    def render(self) -> None:
        self._set_buttons()
        chips = (f"<span data-stage='{row['stage']}' data-status='{row['status']}' "
                 f"style='{STATUS_STYLE[row['status']]}' title='{escape(row['title'])}'>"
                 f"{STATUS_MARK[row['status']]}{escape(row['stage'])}</span>"
                 for row in self.lab.stages)
        self.stages_html.value = ("<div class='vlab-stages' style='font-size:12px'>"
                                  + " &rarr; ".join(chips) + "</div>")
        record = self.latest_record
        if record is not None:
            self.record_html.value = record._repr_html_()

    @property
    def latest_record(self):
        return next(reversed(self.lab.records.values()), None)

    def summary(self) -> str:
        rows = self.lab.stages
        done = sum(row["status"] == "done" for row in rows)
        nxt = self._next_stage_name()
        record = self.latest_record
        lines = [f"stages done: {done}/{len(rows)}" + (f", next: {nxt}" if nxt else ""),
                 f"latest record: {record.name} ({len(record.ioctls)} ioctls)" if record
                 else "no stage done yet"]
        if self.status_text:
            lines.append(self.status_text)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "StageStepper()"


def _describe(result) -> str:
    if isinstance(result, list):
        return "; ".join(f"vcpu{i}: {r}" for i, r in enumerate(result))
    if isinstance(result, StageRecord):   # the table below shows the rest
        return f"{result.name} done in {result.seconds * 1e3:.1f} ms"
    return str(result)
