"""A small MMIO device for lessons: one register of each kind a driver meets.

Modelled on QEMU's teaching device `edu` (hw/misc/edu.c, docs/specs/edu.rst): an
identification register to probe for, a register that simply stores, one whose read has a
side effect, and one whose write makes the device act. Like `edu`, it accepts only aligned
32-bit accesses; anything else reads as all-ones and is ignored on write, which is how a
driver notices it used the wrong width.

    offset  name      access  behaviour
    0x00    ID        R       0x564C4142: "VLAB" in ASCII, most significant byte first
    0x04    SCRATCH   R/W     holds what was written
    0x08    COUNTER   R       counts reads: each read returns the count including itself
    0x0C    DOORBELL  W       each write is logged in `doorbells` and passed to `on_doorbell`

Offsets inside the 16-byte window with no readable register read as 0; writes to them are
ignored.
"""
from __future__ import annotations

from typing import Callable

ID = 0x00
SCRATCH = 0x04
COUNTER = 0x08
DOORBELL = 0x0C

MAGIC = 0x564C4142  # b"VLAB"


class MmioTestDevice:
    """ID / SCRATCH / COUNTER / DOORBELL, 32 bits each, in a 16-byte MMIO window."""

    SIZE = 0x10

    def __init__(self, on_doorbell: Callable[[int], None] | None = None,
                 name: str = "testdev") -> None:
        self.name = name
        self.scratch = 0
        self.counter = 0
        self.doorbells: list[int] = []
        self._on_doorbell = on_doorbell

    def read(self, offset: int, size: int = 4) -> int:
        if size != 4 or offset & 3:
            return (1 << (8 * size)) - 1
        if offset == ID:
            return MAGIC
        if offset == SCRATCH:
            return self.scratch
        if offset == COUNTER:
            self.counter = (self.counter + 1) & 0xFFFFFFFF
            return self.counter
        return 0

    def write(self, offset: int, value: int, size: int = 4) -> None:
        if size != 4 or offset & 3:
            return
        value &= 0xFFFFFFFF
        if offset == SCRATCH:
            self.scratch = value
        elif offset == DOORBELL:
            self.doorbells.append(value)
            if self._on_doorbell is not None:
                self._on_doorbell(value)

    def state(self) -> dict:
        return {"id": MAGIC, "scratch": self.scratch, "counter": self.counter,
                "doorbells": len(self.doorbells)}
