"""The two ports through which a PC guest resets the machine, as QEMU's `pc` has them.

- Port 0x92, System Control Port A (QEMU's `port92`, hw/i386/port92.c): bit 0 is the fast
  reset, bit 1 the fast A20 gate. Setting bit 0 where it was clear asks for a reset; the
  port reads back the last value written. A20 needs no gate under KVM (it never masks
  address bit 20), so bit 1 is only stored; it reads as set from the start, as A20 is on.
- Port 0xcf9, the PIIX3's Reset Control Register (QEMU's `rcr_write`, hw/isa/piix3.c): a
  write with bit 2 (reset CPU) set asks for a reset; otherwise bit 1 (system reset type)
  is kept and reads back.

Each device calls the injected `on_reset(cause)` with a sentence naming the write; what
happens then (stop, as QEMU's `-no-reboot`, or reboot) is the machine's business.
"""
from __future__ import annotations

from typing import Callable

PORT92 = 0x92
PORT92_RESET = 1 << 0
PORT92_A20 = 1 << 1
RCR = 0xCF9
RCR_SYS_RST = 1 << 1
RCR_RST_CPU = 1 << 2


class Port92:
    """System Control Port A."""

    IOBASE, SIZE = PORT92, 1

    def __init__(self, on_reset: Callable[[str], None] | None = None,
                 name: str = "port92") -> None:
        self.name = name
        self.outport = PORT92_A20
        self._on_reset = on_reset

    def read(self, offset: int, size: int = 1) -> int:
        return self.outport

    def write(self, offset: int, value: int, size: int = 1) -> None:
        value &= 0xFF
        old, self.outport = self.outport, value
        if value & PORT92_RESET and not old & PORT92_RESET and self._on_reset is not None:
            self._on_reset(f"port 0x92 fast reset (wrote {value:#04x})")

    def reset(self) -> None:
        """QEMU's port92_reset: the reset bit clears, A20 stays."""
        self.outport &= ~PORT92_RESET

    def state(self) -> dict:
        return {"outport": self.outport}


class ResetControl:
    """The PIIX3 Reset Control Register at 0xcf9."""

    IOBASE, SIZE = RCR, 1

    def __init__(self, on_reset: Callable[[str], None] | None = None,
                 name: str = "piix3-rcr") -> None:
        self.name = name
        self.rcr = 0
        self._on_reset = on_reset

    def read(self, offset: int, size: int = 1) -> int:
        return self.rcr

    def write(self, offset: int, value: int, size: int = 1) -> None:
        if value & RCR_RST_CPU:
            if self._on_reset is not None:
                self._on_reset(f"port 0xcf9 reset control (wrote {value & 0xFF:#04x})")
            return
        self.rcr = value & RCR_SYS_RST

    def state(self) -> dict:
        return {"rcr": self.rcr}
