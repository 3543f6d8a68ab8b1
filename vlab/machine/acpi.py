"""The ACPI tables a PC without firmware gives Linux, so that `poweroff` ends the run.

Why ACPI at all: without it Linux has no way to switch the machine off. Its `poweroff`
falls back to halting (`native_machine_halt`: every CPU in `hlt` with interrupts off), and
with the irqchip in the kernel KVM keeps such a vCPU asleep inside KVM_RUN: nothing reaches
userspace, and the VMM cannot tell a powered-off guest from an idle one. With a FADT, Linux
enters S5 by writing SLP_TYP|SLP_EN to the PM1a control port, an exit the machine ends the
run on (vlab.devices.acpi_pm). QEMU's `pc` does the same through its PIIX4; its `microvm`
uses a hardware-reduced FADT with a sleep control register instead, but Linux's hardware-
reduced mode drops the legacy PIC and the PIT timer, which this machine gives.

The tables, as Linux finds them with no EFI and no bootloader hint: it scans 0xE0000-0xFFFFF
for the RSDP's "RSD PTR " on a 16-byte boundary (`acpi_find_root_pointer`), where a BIOS
keeps it. All the tables go at 0xF0000, which the e820 map reserves (the BIOS area), so
nothing overwrites them.

    RSDP  revision 0 (ACPI 1.0): the RSDT's 32-bit address
    RSDT  the FADT and the MADT
    FADT  revision 3 (ACPI 2.0): PM1a event block 0x600 (4 bytes), PM1a control 0x604
          (2 bytes), SCI on IRQ 9, no SMI_CMD (the machine is in ACPI mode already), no PM
          timer and no GPE blocks (optional: Linux keeps time with kvmclock and the TSC),
          the reset register (port 0xcf9, value 6, as QEMU's: Linux's default reboot),
          IAPC_BOOT_ARCH 8042 (an i8042 is present: Linux probes it), CENTURY 0x32 (the
          CMOS RTC's century byte)
    FACS  the firmware control structure the FADT points at (no waking vector: no S3)
    DSDT  one object in AML, Name(_S5, Package() {0, 0, 0, 0}): S5's SLP_TYP is 0
    MADT  a local APIC per vCPU, the IOAPIC at 0xfec00000 (GSI base 0), and IRQ 9 (the SCI)
          overridden to active-high level, as QEMU's. KVM's default routing sends GSI n to
          the IOAPIC's input n, so the ISA IRQs, the PIT's IRQ 0 included, need no other
          override (QEMU reroutes GSI 0 to input 2 and says so with an override).
"""
from __future__ import annotations

import struct

from ..devices.acpi_pm import (PM1_CNT_LEN, PM1_EVT_LEN, PM1A_CNT_BLK, PM1A_EVT_BLK,
                               SCI_IRQ, SLP_TYP_S5)
from ..devices.reset import RCR

BASE = 0xF0000                  # in the BIOS area Linux scans for the RSDP
OEM_ID, OEM_TABLE_ID, CREATOR_ID = b"VLAB  ", b"VLABPC  ", b"VLAB"
LAPIC_ADDRESS, IOAPIC_ADDRESS = 0xFEE00000, 0xFEC00000
IOAPIC_ID = 0                   # what KVM's IOAPIC reports in its ID register (QEMU's too)
RTC_CENTURY = 0x32

FADT_WBINVD, FADT_PROC_C1, FADT_PWR_BUTTON, FADT_SLP_BUTTON = 1 << 0, 1 << 2, 1 << 4, 1 << 5
FADT_FIX_RTC, FADT_RESET_REG_SUP = 1 << 6, 1 << 10
IAPC_LEGACY_DEVICES, IAPC_8042 = 1 << 0, 1 << 1
GAS_SYSTEM_IO, GAS_BYTE_ACCESS = 1, 1
RESET_VALUE = 0x06              # QEMU's: RST_CPU | SYS_RST at 0xcf9
MADT_PCAT_COMPAT = 1            # the two 8259s are there too
MADT_LAPIC, MADT_IOAPIC, MADT_ISO = 0, 1, 2
ISO_ACTIVE_HIGH_LEVEL = 0x000D  # polarity 01 (high), trigger 11 (level)


def checksum(data: bytes) -> int:
    """The byte that makes `data` sum to 0 mod 256."""
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (checksum over the whole) and body."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0, OEM_ID,
                         OEM_TABLE_ID, 1, CREATOR_ID, 1)
    data = bytearray(header + body)
    data[9] = checksum(data)
    return bytes(data)


def rsdp(rsdt_address: int) -> bytes:
    data = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_address))
    data[8] = checksum(data)
    return bytes(data)


def dsdt() -> bytes:
    """DefinitionBlock with Name(_S5, Package(4) {SLP_TYP_S5, 0, 0, 0}) in AML: NameOp,
    the name, PackageOp, PkgLength (itself, the count, four ZeroOp/ByteConst elements)."""
    elements = bytes([SLP_TYP_S5]) if SLP_TYP_S5 in (0, 1) else bytes([0x0A, SLP_TYP_S5])
    elements += b"\x00\x00\x00"
    package = bytes([0x12, 2 + len(elements), 4]) + elements
    return table(b"DSDT", 2, b"\x08_S5_" + package)


def facs() -> bytes:
    """64 bytes, no checksum: signature, length, hardware signature, no waking vector."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 1, b"", 0, b"")


def gas(address: int, width: int) -> bytes:
    """A Generic Address Structure in system I/O space."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width, 0, GAS_BYTE_ACCESS, address)


def fadt(facs_address: int, dsdt_address: int) -> bytes:
    body = bytearray(244 - 36)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", facs_address, dsdt_address)
    put(46, "<H", SCI_IRQ)
    put(56, "<I", PM1A_EVT_BLK)
    put(64, "<I", PM1A_CNT_BLK)
    put(88, "<BB", PM1_EVT_LEN, PM1_CNT_LEN)
    put(96, "<HH", 0xFFF, 0xFFF)            # C2/C3 latencies above their limits: no C2/C3
    put(108, "<BH", RTC_CENTURY, IAPC_LEGACY_DEVICES | IAPC_8042)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
        | FADT_FIX_RTC | FADT_RESET_REG_SUP)
    put(116, "<12sB", gas(RCR, 8), RESET_VALUE)
    return table(b"FACP", 3, bytes(body))


def madt(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, MADT_PCAT_COMPAT)
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, cpu, cpu, 1)     # enabled
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, SCI_IRQ, SCI_IRQ, ISO_ACTIVE_HIGH_LEVEL)
    return table(b"APIC", 1, body)


def build_tables(cpus: int, base: int = BASE) -> bytes:
    """Every table, laid out from `base` (the RSDP first), as the bytes to copy there."""
    layout = bytearray()

    def place(data: bytes, align: int = 16) -> int:
        layout.extend(b"\0" * (-len(layout) % align))
        at = base + len(layout)
        layout.extend(data)
        return at

    place(b"\0" * 20)                                   # the RSDP, filled in last
    facs_at = place(facs(), 64)
    dsdt_at = place(dsdt())
    fadt_at = place(fadt(facs_at, dsdt_at))
    madt_at = place(madt(cpus))
    rsdt_at = place(table(b"RSDT", 1, struct.pack("<II", fadt_at, madt_at)))
    layout[0:20] = rsdp(rsdt_at)
    return bytes(layout)
