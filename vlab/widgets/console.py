"""SerialConsole: what the guest printed, streamed, and a line to type into COM1."""
from __future__ import annotations

import ipywidgets as widgets

from .base import MONO, LabView, escape, message

TAIL = 16_384          # characters of output shown (the Console keeps all of it)
STREAM_INTERVAL = 0.1  # seconds between output updates while the guest prints


class SerialConsole(LabView):
    """The machine's console (COM1 and the 0xE9 debug console), updated at most every
    `interval` seconds while the guest prints and at once when a run or step ends; a text
    input whose Enter feeds the line plus `newline` to the UART's receiver
    (`Uart16550.feed`), as if typed on the far end of the wire."""

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
        self.refresh()

    def _attach(self) -> bool:
        machine = self.lab.machine
        if machine is None or not self.lab.registers:
            return False
        console = machine.console
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
        """Feed `text` and `newline` to COM1; returns the bytes the receiver kept."""
        serial = self.lab.machine.devices.get("serial0") if self.lab.machine else None
        if serial is None:
            self.status.value = message("no serial port yet: pc_memory_init adds COM1", "error")
            return 0
        data = (text + self.newline).encode()
        kept = serial.feed(data)
        if kept == len(data):
            note = f"sent {len(data)} bytes to COM1"
        elif not serial.rbr_reads:   # not the student's mistake: say what the guest does
            note = (f"the guest is not reading COM1 (it has never read RBR): {kept} of "
                    f"{len(data)} bytes kept in its receiver, the rest overran (LSR.OE)")
        else:
            note = (f"COM1's receiver is full: {kept} of {len(data)} bytes kept, the rest "
                    f"overran (LSR.OE); the guest reads them while it runs")
        self.status.value = message(note)
        return kept

    def _on_input(self, change) -> None:
        if change["new"]:
            self.feed(change["new"])
            self.input.value = ""

    def summary(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return "SerialConsole()"
