"""MemoryView: a hexdump of guest-physical memory, optionally following RIP."""
from __future__ import annotations

import ipywidgets as widgets

from .base import CHANGED_STYLE, MONO, LabView, escape, message

BYTES_PER_LINE = 16


def linear_rip(snapshot) -> int:
    """CS.base + RIP: where the CPU fetches. vlab's mode setups map memory 1:1, so this is
    also the guest-physical address (with other page tables it need not be)."""
    return snapshot.sregs.cs.base + snapshot.regs.rip


def hexdump(data: bytes, start: int) -> list[str]:
    """`address  hex bytes  |ascii|` lines, 16 bytes each."""
    lines = []
    for offset in range(0, len(data), BYTES_PER_LINE):
        chunk = data[offset:offset + BYTES_PER_LINE]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{start + offset:08x}  {chunk.hex(' '):<47}  |{text}|")
    return lines


class MemoryView(LabView):
    """`length` bytes of guest-physical memory from `start`; with `follow_rip`, the window
    starts one line before the instruction pointer and the byte at RIP is marked. The guest
    writes memory without telling anyone, so the view re-reads after every step and run."""

    def __init__(self, lab, start: int = 0, length: int = 256, follow_rip: bool = False,
                 vcpu: int = 0, live: bool = True):
        super().__init__(lab, live)
        self.start = start
        self.length = length
        self.vcpu = vcpu
        self.address = widgets.Text(description="address", value=f"{start:#x}",
                                    continuous_update=False, layout=widgets.Layout(width="220px"))
        self.follow = widgets.Checkbox(description="follow RIP", value=follow_rip, indent=False)
        self.html = widgets.HTML()
        self.children = (self.caption, widgets.HBox((self.address, self.follow)), self.html)
        self.address.observe(self._on_address, "value")
        self.follow.observe(lambda change: self.render(), "value")
        self.refresh()

    def _attach(self) -> bool:
        return self._on_registers(self.vcpu, self.render)

    def _on_address(self, change) -> None:
        try:
            start = int(change["new"], 0)
        except ValueError:
            self.html.value = message(f"not an address: {change['new']!r} (write e.g. 0x8000)",
                                      "error")
            return
        if start == self.start:   # the view itself moved the address while following RIP
            return
        self.start = start
        if self.follow.value:
            self.follow.value = False   # its observer re-renders
        else:
            self.render()

    def _rip(self) -> int | None:
        model = self.lab.registers[self.vcpu] if len(self.lab.registers) > self.vcpu else None
        return linear_rip(model.current) if model is not None and model.current else None

    def window(self) -> tuple[int, bytes]:
        """(first address, bytes) currently shown; raises ValueError outside guest memory."""
        if self.lab.machine is None or not self.lab.machine.memory.regions:
            raise ValueError("no guest memory yet: pc_memory_init maps it")
        rip = self._rip()
        if self.follow.value and rip is not None:
            self.start = max(0, rip - rip % BYTES_PER_LINE - BYTES_PER_LINE)
            self.address.value = f"{self.start:#x}"
        return self.start, self.lab.machine.memory.read(self.start, self.length)

    def render(self) -> None:
        try:
            start, data = self.window()
        except ValueError as e:   # not mapped yet, or a range outside guest memory
            mapped = self.lab.machine is not None and self.lab.machine.memory.regions
            self.html.value = message(str(e), "error" if mapped else "info")
            return
        rip = self._rip()
        lines = []
        for offset, line in zip(range(0, len(data), BYTES_PER_LINE), hexdump(data, start)):
            column = 10 + 3 * (rip - start - offset) if rip is not None else -1
            if 10 <= column < 10 + 3 * BYTES_PER_LINE:   # RIP's byte is on this line
                line = (f"{escape(line[:column])}<span class='vlab-rip' style='{CHANGED_STYLE}'"
                        f" title='RIP'>{line[column:column + 2]}</span>{escape(line[column + 2:])}")
            else:
                line = escape(line)
            lines.append(line)
        self.html.value = (f"<pre class='vlab-memory' style='{MONO};margin:0;white-space:pre'>"
                           + "\n".join(lines) + "</pre>")

    def summary(self) -> str:
        try:
            start, data = self.window()
        except ValueError as e:
            return str(e)
        return "\n".join(hexdump(data, start))

    def __repr__(self) -> str:
        return f"MemoryView(start={self.start:#x}, length={self.length})"
