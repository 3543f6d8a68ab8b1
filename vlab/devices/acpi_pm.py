"""ACPI's fixed power-management registers, PM1a event and control, at the I/O ports QEMU's
`pc` gives its PIIX4 power management function (hw/acpi/piix4.c, base 0x600).

    0x600  PM1a_STS  16 bits  status; a 1 written clears the bit (WAK_STS is bit 15)
    0x602  PM1a_EN   16 bits  enables of the fixed events
    0x604  PM1a_CNT  16 bits  SCI_EN (bit 0), SLP_TYP (bits 10-12), SLP_EN (bit 13)

A write to PM1a_CNT with SLP_EN set enters the sleep state SLP_TYP names. The DSDT's `\\_S5`
package says which value is soft-off; as QEMU's (`acpi_pm1_cnt_write`), 0 is: the device
then asks `on_poweroff(cause)`, and the machine ends the run as QEMU does at a guest's
shutdown. Other sleep states are not offered (the DSDT has no \\_S1-\\_S4), so their writes
are only kept. SCI_EN reads as set from the start: there is no SMI_CMD port to switch the
machine into ACPI mode, so ACPICA finds it in ACPI mode already. No fixed event is ever
raised here, so the SCI (IRQ 9) stays low.
"""
from __future__ import annotations

from typing import Callable

PM_BASE = 0x600
PM1_EVT_LEN, PM1_CNT_LEN = 4, 2
PM1A_EVT_BLK, PM1A_CNT_BLK = PM_BASE, PM_BASE + PM1_EVT_LEN
SCI_IRQ = 9

PM1_STS, PM1_EN, PM1_CNT = 0, 2, 4     # offsets from PM_BASE
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP = 7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13               # write-only: reads as 0
SLP_TYP_S5 = 0                         # the DSDT's \_S5 value (QEMU's)


class AcpiPm:
    """PM1a status, enable and control, byte-addressed from PM_BASE."""

    IOBASE, SIZE = PM_BASE, PM1_EVT_LEN + PM1_CNT_LEN

    def __init__(self, on_poweroff: Callable[[str], None] | None = None,
                 name: str = "acpi-pm") -> None:
        self.name = name
        self._on_poweroff = on_poweroff
        self.regs = {PM1_STS: 0, PM1_EN: 0, PM1_CNT: PM1_CNT_SCI_EN}

    def read(self, offset: int, size: int = 1) -> int:
        value = 0
        for i in range(size):
            at = offset + i
            reg = at & ~1
            if reg in self.regs:
                value |= (self.regs[reg] >> (8 * (at & 1)) & 0xFF) << (8 * i)
            else:
                value |= 0xFF << (8 * i)
        return value

    def write(self, offset: int, value: int, size: int = 1) -> None:
        if offset % 2 == 0 and size >= 2:       # whole registers, as ACPICA writes them
            for i in range(0, size, 2):
                self._write_register(offset + i, value >> (8 * i) & 0xFFFF, 0xFFFF)
        else:
            for i in range(size):
                at = offset + i
                shift = 8 * (at & 1)
                self._write_register(at & ~1, (value >> (8 * i) & 0xFF) << shift, 0xFF << shift)

    def _write_register(self, reg: int, value: int, mask: int) -> None:
        if reg == PM1_STS:
            self.regs[PM1_STS] &= ~(value & mask)       # write 1 to clear
        elif reg == PM1_EN:
            self.regs[PM1_EN] = self.regs[PM1_EN] & ~mask | value & mask
        elif reg == PM1_CNT:
            self.regs[PM1_CNT] = (self.regs[PM1_CNT] & ~mask | value & mask) & ~PM1_CNT_SLP_EN
            sleep_type = (value & PM1_CNT_SLP_TYP) >> PM1_CNT_SLP_TYP_SHIFT
            if (value & mask & PM1_CNT_SLP_EN and sleep_type == SLP_TYP_S5
                    and self._on_poweroff is not None):
                self._on_poweroff(f"ACPI S5 (soft off): PM1a_CNT written {value:#06x}")

    def state(self) -> dict:
        return {"pm1_sts": self.regs[PM1_STS], "pm1_en": self.regs[PM1_EN],
                "pm1_cnt": self.regs[PM1_CNT]}
