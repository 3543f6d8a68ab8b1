"""SerialConsole: what the guest printed, streamed, and a line to type into COM1."""
from __future__ import annotations

import threading

import ipywidgets as widgets

from .base import MONO, POLLER, LabView, escape, message

TAIL = 16_384          # characters of output shown (the Console keeps all of it)
STREAM_INTERVAL = 0.1  # seconds between output updates while the guest prints


class SerialConsole(LabView):
    """The machine's console (COM1 and the 0xE9 debug console), updated at most every
    `interval` seconds while the guest prints and at once when a run or step ends; a text
    input whose Enter feeds the line plus `newline` to the UART's receiver
    (`Uart16550.feed`), as if typed on the far end of the wire. To a guest that reads COM1,
    what its receiver cannot take yet waits here and follows as the guest reads RBR (QEMU's
    chardev asks `serial_can_receive` the same way); to one that never read it, the rest
    overruns the receiver (LSR.OE), which is what that guest would meet on a real wire."""

    def __init__(self, lab, newline: str = "\r", interval: float = STREAM_INTERVAL):
        super().__init__(lab)
        self.newline = newline
        self.output = widgets.HTML()
        self.input = widgets.Text(placeholder="type a line, Enter sends it to COM1",
                                  continuous_update=False, layout=widgets.Layout(width="100%"))
        self.status = widgets.HTML()
        self.children = (self.output, self.input, self.status)
        self.input.observe(self._on_input, "value")
        self.interval = interval
        self._pending = b""              # typed, waiting for room in COM1's receiver
        self._pending_lock = threading.Lock()
        self.refresh()

    def _attach(self) -> bool:
        machine = self.lab.machine
        if machine is None or not self.lab.registers:
            return False
        console, serial = machine.console, machine.devices.get("serial0")
        if serial is not None:   # each RBR read makes room for what waits
            self._detachers.append(POLLER.watch(lambda: serial.rbr_reads,
                                                lambda: self._send_pending(serial), 0.0))
        return self._redraw_on(lambda: console.writes, self.interval, None)

    @property
    def text(self) -> str:
        return self.lab.machine.console.text if self.lab.machine else ""

    def render(self) -> None:
        shown = self.text[-TAIL:]
        # column-reverse keeps the box scrolled to its newest line
        self.output.value = (
            "<div style='display:flex;flex-direction:column-reverse;max-height:180px;"
            "overflow:auto;background:#111;color:#ddd;padding:4px'>"
            f"<pre class='vlab-console' style='{MONO};margin:0;color:#ddd'>{escape(shown)}</pre>"
            "</div>")

    def feed(self, text: str) -> int:
        """Feed `text` and `newline` to COM1; returns the bytes the receiver took now."""
        serial = self.lab.machine.devices.get("serial0") if self.lab.machine else None
        if serial is None:
            self.status.value = message("no serial port yet: pc_memory_init adds COM1", "error")
            return 0
        data = (text + self.newline).encode()
        if not serial.rbr_reads:   # not the student's mistake: say what the guest does
            kept = serial.feed(data)
            note = (f"sent {len(data)} bytes to COM1" if kept == len(data) else
                    f"the guest is not reading COM1 (it has never read RBR): {kept} of "
                    f"{len(data)} bytes kept in its receiver, the rest overran (LSR.OE)")
        else:
            with self._pending_lock:
                self._pending += data
            kept = self._send_pending(serial)
            waiting = len(self._pending)
            note = f"sent {kept} bytes to COM1" + (
                f"; {waiting} more follow as the guest reads its receiver" if waiting else "")
        self.status.value = message(note)
        return kept

    def _send_pending(self, serial) -> int:
        """What waits, as far as COM1's receiver has room; the bytes it took."""
        with self._pending_lock:
            if not self._pending:
                return 0
            sent = serial.feed_what_fits(self._pending)
            self._pending = self._pending[sent:]
        if not self._pending and "follow as the guest reads" in self.status.value:
            self.status.value = message("the guest has read all that was typed")
        return sent

    def _on_input(self, change) -> None:
        if change["new"]:
            self.feed(change["new"])
            self.input.value = ""

    def summary(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return "SerialConsole()"
