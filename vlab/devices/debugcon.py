"""The Bochs/QEMU debug console: port 0xE9, one byte out per write, no setup, no status.

QEMU's `isa-debugcon` (hw/char/debugcon.c) forwards each byte written to its port to a
character device and answers reads with a fixed `readback` value, 0xE9 by default, so a
guest can probe for the port. It is the simplest way for guest code to print: a single
`out 0xe9, al`, which is why the early lessons use it before the 16550.
"""
from __future__ import annotations

from typing import Callable


_BYTES = [bytes((i,)) for i in range(256)]


class DebugConsole:
    """`isa-debugcon`: each write emits its low byte; reads return `readback`."""

    IOBASE = 0xE9
    SIZE = 1

    def __init__(self, output: Callable[[bytes], None] | None = None,
                 name: str = "debugcon", readback: int = 0xE9) -> None:
        self.name = name
        self.readback = readback
        self._output = output
        self._data = bytearray()

    def read(self, offset: int, size: int = 1) -> int:
        return self.readback

    def write(self, offset: int, value: int, size: int = 1) -> None:
        # QEMU keeps only the low byte of a wider access: `unsigned char ch = val;`.
        byte = _BYTES[value & 0xFF]
        self._data += byte
        if self._output is not None:
            self._output(byte)

    @property
    def text(self) -> str:
        """Everything written so far, decoded as UTF-8."""
        return self._data.decode("utf-8", "replace")

    def state(self) -> dict:
        return {"readback": self.readback, "bytes_written": len(self._data)}
