"""Inside KVM_RUN, from KVM's own tracepoints (`vlab.Lab(..., kernel_trace=True)`).

KernelExitTable: exits by reason as the kernel names them, how many KVM handled itself
beside how many reached userspace (the table `kvm_stat` shows), over
`ExitLog.kernel_exit_table()`.
KvmRunTimeline: one KVM_RUN as a sequence diagram in three lanes (userspace, KVM, guest):
VM entries and exits, the instructions KVM's emulator executed, port and MMIO accesses,
interrupts injected, and the exit to userspace that ended it. Its model, `RunTimeline`, is
built from an exit record's `kernel_events` and needs no widget.

Both show any record of vlab.kvm.kernel_events, typed or raw, by its tracepoint name and
`describe()`; which exits KVM handled itself is `exit_outcomes`' answer, as in the table.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import ipywidgets as widgets

from ..kvm.kernel_events import KvmExit, exit_outcomes
from .base import CELL_STYLE, MONO, TABLE_STYLE, ExitLogView, cell, escape, message, table

REDRAW_INTERVAL = 0.2   # seconds between live redraws while the guest runs
LANE_WIDTH = "190px"
# Rows as dense as text: an HTML widget's content otherwise gets the widget line height
BLOCK = "line-height:1.4"
HEAD_ROWS, TAIL_ROWS = 24, 12   # a longer KVM_RUN shows its start and its end, the middle counted

# Where each tracepoint happens: (lane it starts in, lane it goes to, kind). A kind names the
# row's colour and CSS class (vlab-kind-<kind>). Lanes are the three places a vCPU thread can be.
USERSPACE, KVM, GUEST = "userspace", "KVM", "guest"
LANES = (USERSPACE, KVM, GUEST)
_PLACES = {
    "kvm_entry": (KVM, GUEST, "entry"),
    "kvm_exit": (GUEST, KVM, "exit"),
    "kvm_userspace_exit": (KVM, USERSPACE, "userspace"),
    "kvm_emulate_insn": (KVM, KVM, "emulate"),
    "kvm_pio": (KVM, KVM, "io"),
    "kvm_mmio": (KVM, KVM, "io"),
    "kvm_fast_mmio": (KVM, KVM, "io"),
    "kvm_inj_virq": (KVM, GUEST, "irq"),
    "kvm_inj_exception": (KVM, GUEST, "irq"),
    "kvm_fpu": (KVM, KVM, "fpu"),
    "kvm_cpuid": (KVM, KVM, "handled"),
    "kvm_msr": (KVM, KVM, "handled"),
    "kvm_cr": (KVM, KVM, "handled"),
    "kvm_page_fault": (KVM, KVM, "handled"),
    "kvm_hypercall": (KVM, KVM, "handled"),
}
_IRQ_PREFIXES = ("kvm_set_irq", "kvm_apic", "kvm_pic", "kvm_ioapic", "kvm_msi", "kvm_vcpu_wakeup",
                 "kvm_ack_irq", "kvm_eoi", "kvm_pv_eoi")
COLORS = {   # kind: (background, text)
    "call": ("#fff8e1", "#8d6e00"),
    "entry": ("#e8f5e9", "#2e7d32"),
    "exit": ("#e3f2fd", "#1565c0"),
    "emulate": ("#fff3e0", "#e65100"),
    "io": ("#e0f2f1", "#00695c"),
    "handled": ("#efebe9", "#6d4c41"),
    "irq": ("#f3e5f5", "#6a1b9a"),
    "userspace": ("#ffebee", "#b71c1c"),
    "fpu": ("#fafafa", "#9e9e9e"),
    "kernel": ("#f5f5f5", "#424242"),
    "skipped": ("#ffffff", "#757575"),
}
LEGEND = (("entry", "VM entry"), ("exit", "VM exit"), ("emulate", "instruction emulated by KVM"),
          ("io", "port / MMIO access"), ("handled", "answered by KVM (CPUID, MSR, CR, page fault)"),
          ("irq", "interrupt"), ("userspace", "exit to userspace"))


def place(name: str) -> tuple[str, str, str]:
    """(from lane, to lane, kind) of a tracepoint."""
    if name in _PLACES:
        return _PLACES[name]
    if name.startswith(_IRQ_PREFIXES):
        return KVM, KVM, "irq"
    return KVM, KVM, "kernel"


@dataclass(frozen=True)
class TimelineRow:
    offset_ns: int | None    # since KVM_RUN began (the guest FPU load); None for rows vlab adds
    name: str                # the tracepoint (or what vlab adds: KVM_RUN, skipped)
    source: str              # lane the event starts in
    target: str              # lane it goes to (the same for an event inside one lane)
    kind: str
    label: str               # short, in the lane
    text: str                # the event's own describe()
    note: str = ""           # what it means for the KVM_RUN (the return convention)

    def offset(self) -> str:
        """Since KVM_RUN began, in the unit that reads best (a halt waits for milliseconds)."""
        ns = self.offset_ns
        if ns is None:
            return ""
        if abs(ns) < 1_000_000:
            return f"{ns / 1e3:+.1f} us"
        return f"{ns / 1e6:+.3f} ms" if abs(ns) < 1_000_000_000 else f"{ns / 1e9:+.3f} s"

    def line(self) -> str:
        lane = self.source if self.source == self.target else f"{self.source}->{self.target}"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.offset():>12}  {lane:<15} {self.text}{note}"


def _label(event) -> str:
    name = event.name
    if name == "kvm_exit":
        return f"exit: {event.reason_name}"
    if name == "kvm_entry":
        return "VM entry"
    if name == "kvm_userspace_exit":
        return "return to userspace"
    if name == "kvm_emulate_insn":
        return getattr(event, "disassembly", "") or "emulated"
    return name.removeprefix("kvm_")


class RunTimeline:
    """One KVM_RUN from the kernel's side: rows in order, what they add up to, and a short
    text. Each exit says what `handle_exit` returned (`exit_outcomes`): 1, handled in KVM,
    and why `vcpu_run` went on (another entry, a halt in `vcpu_block`, or a pending signal
    that ended the loop); or 0, the exit KVM needed userspace for."""

    def __init__(self, record, head: int = HEAD_ROWS, tail: int = TAIL_ROWS):
        self.record = record
        self.events = events = tuple(getattr(record, "kernel_events", ()) or ())
        names = [event.name for event in events]
        # KVM_RUN starts where kvm_arch_vcpu_ioctl_run loads the guest's FPU; what the thread
        # caused before (the MMU notifier when it unmapped memory) is shown before the call.
        start = next((i for i, e in enumerate(events)
                      if e.name == "kvm_fpu" and getattr(e, "load", False)), 0)
        self._origin = events[start].timestamp_ns if events else 0
        self.errno = next((getattr(e, "errno", 0) for e in events
                           if e.name == "kvm_userspace_exit"), 0)
        self.entries = names.count("kvm_entry")
        self.handled_in_kernel: Counter = Counter()
        self.exits_to_userspace: Counter = Counter()
        notes = {}
        exits = [i for i, event in enumerate(events) if isinstance(event, KvmExit)]
        for i, (event, handled) in zip(exits, exit_outcomes(events)):
            notes[i] = (self._outcome(names[i + 1:]) if handled
                        else "handle_exit returned 0: KVM needs userspace")
            counter = self.handled_in_kernel if handled else self.exits_to_userspace
            counter[event.reason_name] += 1
        self.emulated = names.count("kvm_emulate_insn")
        self.injected = names.count("kvm_inj_virq") + names.count("kvm_inj_exception")
        self.io = sum(place(n)[2] == "io" for n in names)
        rows = [self._row(event, notes.get(i, "")) for i, event in enumerate(events)]
        call = TimelineRow(None, "KVM_RUN", USERSPACE, KVM, "call", "KVM_RUN",
                           f"vcpu{record.vcpu} ioctl(KVM_RUN)",
                           "kvm_vcpu_ioctl -> kvm_arch_vcpu_ioctl_run -> vcpu_run")
        self.rows = _collapse(rows[:start] + [call] + rows[start:], head, tail)

    @staticmethod
    def _outcome(after: list[str]) -> str:
        """Why KVM went on after an exit it handled (exit_outcomes says which it handled)."""
        if "kvm_entry" in after:
            return "handled in KVM: handle_exit returned 1, vcpu_run enters the guest again"
        if "kvm_vcpu_wakeup" in after:
            return "handled in KVM: the vCPU halts, vcpu_run waits in vcpu_block"
        return "handled in KVM, but a signal is pending: vcpu_run stops"

    def _row(self, event, note: str) -> TimelineRow:
        source, target, kind = place(event.name)
        if event.name == "kvm_userspace_exit":
            note = ("KVM_RUN returns 0: kvm_run.exit_reason says why" if not self.errno else
                    "KVM_RUN returns -EINTR (a signal, or immediate_exit): KVM_EXIT_INTR"
                    if event.reason_name == "EINTR" else f"KVM_RUN fails: {event.reason_name}")
        elif event.name == "kvm_vcpu_wakeup":
            note = "vcpu_block: the halted vCPU wakes up"
        return TimelineRow(event.timestamp_ns - self._origin, event.name, source, target, kind,
                           _label(event), event.describe(), note)

    @property
    def seq(self) -> int:
        return self.record.seq

    def headline(self) -> str:
        """What the KVM_RUN adds up to; what did not happen is left out (kvm_pvm traces no
        VM entry, VMX and SVM emulate almost nothing)."""
        handled = sum(self.handled_in_kernel.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self.handled_in_kernel.most_common())
        parts = [_count(self.entries, "VM entry", "VM entries"),
                 _count(handled, "exit handled in KVM", "exits handled in KVM")
                 + (f" ({reasons})" if reasons else ""),
                 _count(self.emulated, "instruction emulated", "instructions emulated"),
                 _count(self.io, "port or MMIO access", "port or MMIO accesses"),
                 _count(self.injected, "interrupt or exception injected",
                        "interrupts or exceptions injected")]
        done = ", ".join(part for part in parts if not part.startswith("0 ")) or "no kernel events"
        return (f"KVM_RUN #{self.seq} (vCPU {self.record.vcpu}): {done}; "
                f"then to userspace: {self.record.reason}")

    def summary(self) -> str:
        return "\n".join([self.headline()] + [row.line() for row in self.rows])


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _collapse(rows: list[TimelineRow], head: int, tail: int) -> list[TimelineRow]:
    """The first `head` and last `tail` rows of a long KVM_RUN, the ones between counted by
    tracepoint in one row (a CPL 0 loop on an emulating backend is one row per instruction)."""
    if len(rows) <= head + tail + 1:
        return rows
    hidden = rows[head:len(rows) - tail]
    counts = Counter(row.name for row in hidden)
    text = f"... {len(hidden):,} more events: " + ", ".join(
        f"{name} {n:,}" for name, n in counts.most_common())
    skipped = TimelineRow(None, "skipped", KVM, KVM, "skipped", f"{len(hidden):,} more", text)
    return rows[:head] + [skipped] + rows[-tail:]


def _pill(kind: str, text: str, title: str = "") -> str:
    background, color = COLORS[kind]
    tip = f" title='{escape(title)}'" if title else ""
    return (f"<span{tip} style='background:{background};color:{color};border:1px solid {color};"
            f"border-radius:3px;padding:0 4px;white-space:nowrap'>{escape(text)}</span>")


def _lane_cells(row: TimelineRow) -> str:
    """The three lane cells: the event's label where it happens; for an event that moves
    the thread between lanes (VM entry: KVM to guest; exit to userspace: KVM to userspace)
    a line from the middle of its source lane to an arrowhead at its label."""
    start, end = LANES.index(row.source), LANES.index(row.target)
    color = COLORS[row.kind][1]
    rightward = end > start
    cells = []
    for i in range(len(LANES)):
        style = f"padding:1px 0;border-left:1px dashed #ccc;width:{LANE_WIDTH}"
        content = ""
        if i == end:
            label = _pill(row.kind, row.label, row.text)
            if start == end:
                style += ";text-align:center"
                content = label
            elif rightward:
                style += ";text-align:left"
                content = f"<span style='color:{color}'>▶</span>{label}"
            else:
                style += ";text-align:right"
                content = f"{label}<span style='color:{color}'>◀</span>"
        elif i == start:
            style += ";" + _line("right" if rightward else "left", "50%", color)
        elif min(start, end) < i < max(start, end):
            style += ";" + _line("left", "100%", color)
        cells.append(f"<td style='{style}'>{content}</td>")
    return "".join(cells)


def _line(side: str, width: str, color: str) -> str:
    """CSS for a 2px horizontal line over `width` of a cell from its `side`."""
    return f"background:linear-gradient({color},{color}) no-repeat {side} center / {width} 2px"


def timeline_html(timeline: RunTimeline) -> str:
    """The diagram: a headline, a strip of one mark per row (the KVM_RUN at a glance), the
    legend, and the rows."""
    strip = "".join(
        f"<span title='{escape(row.text)}' style='display:inline-block;width:10px;height:14px;"
        f"margin-right:1px;background:{COLORS[row.kind][1]}'></span>" if row.kind != "skipped"
        else f"<span style='{MONO};color:#757575;padding:0 3px'>⋯ {escape(row.label)} ⋯</span>"
        for row in timeline.rows)
    legend = " ".join(_pill(kind, text) for kind, text in LEGEND)
    head = "".join(cell(h, tag="th") for h in ("time", *LANES, "what happened"))
    body = []
    for row in timeline.rows:
        background = "#fafafa" if row.kind in ("fpu", "skipped") else "white"
        note = (f"<br><span style='color:{COLORS[row.kind][1]}'>{escape(row.note)}</span>"
                if row.note else "")
        body.append(f"<tr class='vlab-kind-{row.kind}' style='background:{background}'>"
                    f"<td style='{CELL_STYLE};white-space:nowrap'>{row.offset()}</td>"
                    f"{_lane_cells(row)}"
                    f"<td style='padding:1px 6px'>{escape(row.text)}{note}</td></tr>")
    return (f"<div style='{BLOCK}'><div style='{MONO};font-weight:bold;margin:2px 0'>"
            f"{escape(timeline.headline())}</div>"
            f"<div class='vlab-timeline-strip' style='margin:4px 0'>{strip}</div>"
            f"<div style='{MONO};margin:2px 0 6px'>{legend}</div>"
            f"<table style='{TABLE_STYLE}'><tr>{head}</tr>{''.join(body)}</table></div>")


def tracing_state(lab) -> str | None:
    """Why there are no kernel events to show (None: the Lab traces its KVM_RUNs)."""
    if getattr(lab, "kernel_trace", None) is not None:
        return None
    return ("kernel tracing is off for this Lab: vlab.Lab(..., kernel_trace=True) turns it on "
            "(kvm only)")


def lost_note(lab) -> str:
    """The ring buffer's overruns so far: a timeline with lost events is incomplete. (A
    live redraw may come after the Lab closed its trace.)"""
    trace = getattr(lab, "kernel_trace", None)
    lost = trace.lost if trace is not None and not trace.closed else 0
    if not lost:
        return ""
    return f"{lost:,} events lost (tracefs ring buffer overrun): some KVM_RUNs are incomplete"


def backend_note(backend) -> str:
    """What a timeline on a backend without kvm_entry/kvm_exit shows instead."""
    text = (f"{backend.label}: KVM fires no kvm_entry or kvm_exit on this backend, so the guest "
            f"lane stays empty")
    if backend.emulates_kernel_mode:
        text += "; the guest's CPL 0 code shows as the instructions KVM's emulator ran"
    return text


class _TraceView(ExitLogView):
    """A view of what the kernel trace adds to one vCPU's exit log, drawn as HTML."""

    def __init__(self, lab, vcpu: int, interval: float):
        super().__init__(lab, vcpu, interval)
        self.html = widgets.HTML()

    def _missing(self) -> str | None:
        if self.exit_log is None:
            return f"vCPU {self.vcpu} does not exist yet: kvm_init_vcpu creates it"
        return tracing_state(self.lab)


class KernelExitTable(_TraceView):
    """kvm_stat's table for one vCPU: every exit reason the kernel reported, how many KVM
    handled itself and how many reached userspace, with bars on a log scale (a CPL 0 loop
    emulated instruction by instruction counts millions beside a few port writes)."""

    def __init__(self, lab, vcpu: int = 0, interval: float = REDRAW_INTERVAL):
        super().__init__(lab, vcpu, interval)
        self.children = (self.html,)
        self.redraws = 0
        self.refresh()

    def table(self):
        """The exit log's kernel_exit_table(), or None while there is nothing to count."""
        return None if self._missing() else self.exit_log.kernel_exit_table()

    def render(self) -> None:
        with self._lock:
            missing = self._missing()
            if missing:
                self.html.value = message(missing)
                return
            counts = self.table()
            rows = counts.rows
            top = max((max(r.in_kernel, r.userspace) for r in rows), default=0)
            body = [f"<tr data-reason='{escape(r.reason)}'>{cell(r.reason)}"
                    f"{_bar_cell(r.in_kernel, top, 'exit')}"
                    f"{_bar_cell(r.userspace, top, 'userspace')}</tr>" for r in rows]
            notes = [message(f"{counts.runs:,} KVM_RUNs traced, {counts.emulated:,} instructions "
                             f"emulated by KVM" if rows else "no exits yet")]
            lost = lost_note(self.lab)
            if lost:
                notes.append(message(lost, "error"))
            title = message(f"vCPU {self.vcpu}: exits by reason, as the kernel names them")
            self.html.value = (f"<div style='{BLOCK}'>{title}"
                               + table(body, ("exit reason", "handled in KVM", "reached userspace"))
                               + "".join(notes) + "</div>")
            self.redraws += 1

    def summary(self) -> str:
        missing = self._missing()
        if missing:
            return missing
        text = str(self.table())
        lost = lost_note(self.lab)
        return f"{text}\n{lost}" if lost else text

    def __repr__(self) -> str:
        return f"KernelExitTable(vcpu={self.vcpu})"


def _bar_cell(count: int, top: int, kind: str) -> str:
    width = 0 if not count else round(120 * (math.log10(count) + 1) / (math.log10(top) + 1))
    bar = (f"<span style='display:inline-block;vertical-align:middle;height:10px;width:{width}px;"
           f"background:{COLORS[kind][1]};margin-right:4px'></span>")
    return f"<td style='padding:1px 6px;white-space:nowrap'>{bar}{count:,}</td>"


class KvmRunTimeline(_TraceView):
    """One KVM_RUN of one vCPU, from entry to the exit that reached userspace. It follows
    the latest exit unless `seq` picks one (◀ ▶ step through the kept records; "latest"
    follows again)."""

    def __init__(self, lab, vcpu: int = 0, seq: int | None = None,
                 interval: float = REDRAW_INTERVAL):
        super().__init__(lab, vcpu, interval)
        self.seq = seq
        self.timeline: RunTimeline | None = None
        self.previous = widgets.Button(description="◀", tooltip="the KVM_RUN before",
                                       layout=widgets.Layout(width="40px"))
        self.next = widgets.Button(description="▶", tooltip="the KVM_RUN after",
                                   layout=widgets.Layout(width="40px"))
        self.latest = widgets.Button(description="latest", tooltip="follow the latest KVM_RUN",
                                     layout=widgets.Layout(width="70px"))
        self.previous.on_click(lambda _: self.show(self._neighbour(-1)))
        self.next.on_click(lambda _: self.show(self._neighbour(+1)))
        self.latest.on_click(lambda _: self.show(None))
        self.children = (widgets.HBox((self.previous, self.next, self.latest)), self.html)
        self.refresh()

    def show(self, seq: int | None) -> None:
        """Show the KVM_RUN that ended in exit record `seq` (None: follow the latest)."""
        self.seq = seq
        self.render()

    def _without_entries(self) -> bool:
        backend = getattr(self.lab, "backend", None)
        return backend is not None and not backend.traces_vm_entries

    def record(self):
        """The exit record shown: number `seq` among the kept ones, or the latest."""
        log = self.exit_log
        if log is None or log.last is None:
            return None
        if self.seq is None:
            return log.last
        try:
            return log.record(self.seq)
        except IndexError:   # no longer kept
            return None

    def _neighbour(self, step: int) -> int | None:
        log, shown = self.exit_log, self.record()
        if log is None or shown is None or not log.records:
            return self.seq
        return min(max(shown.seq + step, log.first_seq), log.total)

    def render(self) -> None:
        with self._lock:
            missing = self._missing()
            record = None if missing else self.record()
            self.timeline = RunTimeline(record) if record is not None else None
            if missing or record is None:
                self.html.value = message(missing or (f"no exit record #{self.seq} kept" if self.seq
                                                      else "no KVM_RUN has returned yet"))
                return
            notes = [message(backend_note(self.lab.backend))] if self._without_entries() else []
            if not self.timeline.events:
                notes.append(message("no kernel events were recorded for this KVM_RUN"))
            lost = lost_note(self.lab)
            if lost:
                notes.append(message(lost, "error"))
            self.html.value = "".join(notes) + timeline_html(self.timeline)

    def summary(self) -> str:
        missing = self._missing()
        if missing:
            return missing
        record = self.record()
        if record is None:
            return "no KVM_RUN has returned yet"
        return RunTimeline(record).summary()

    def __repr__(self) -> str:
        return f"KvmRunTimeline(vcpu={self.vcpu})"
