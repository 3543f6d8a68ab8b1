"""QEMU's `pc-testdev` (hw/misc/pc-testdev.c), the device kvm-unit-tests' x86 kernels poke.

Not to be confused with `testdev.MmioTestDevice`, vlab's own teaching device. QEMU maps
pc-testdev's pieces at fixed places when `-device pc-testdev` is given:

    where                   QEMU's region            behaviour
    ports 0xe0-0xe3         pc-testdev-ioport        a 32-bit register: an access of any
                                                     width at 0xe0 + k reads or writes its
                                                     bytes k and up
    ports 0xe4-0xe7         pc-testdev-flush-page    a 4-byte write names a guest page whose
                                                     host mapping QEMU re-protects (a TLB
                                                     test); here it is only recorded
    0xff000000-0xff00ffff   pc-testdev-iomem         64 KiB of MMIO that reads back what was
                                                     written, byte for byte

QEMU has two more: the byte-wide view of the same register at 0xe8-0xeb, which would
cover isa-debugcon's 0xe9 here, and ISA IRQ lines at ports 0x2000-0x2017; neither is
modelled. `PcTestdevPorts` and `PcTestdevIomem` are the port and the memory halves, each
a device for one bus; `PcTestdev` holds both.
"""
from __future__ import annotations

IOPORT = 0xE0
FLUSH_PORT = 0xE4
PORTS_SIZE = 8              # 0xe0-0xe3 the register, 0xe4-0xe7 the flush port
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000


class PcTestdevPorts:
    """Ports 0xe0-0xe7: the 32-bit data register and the flush-page port."""

    def __init__(self, name: str = "pc-testdev") -> None:
        self.name = name
        self.data = 0
        self.flushed: list[int] = []   # page addresses written to the flush port

    def read(self, offset: int, size: int = 1) -> int:
        if offset >= FLUSH_PORT - IOPORT:
            return 0
        shift = 8 * offset
        return self.data >> shift & ((1 << (8 * size)) - 1)

    def write(self, offset: int, value: int, size: int = 1) -> None:
        if offset >= FLUSH_PORT - IOPORT:
            if offset == FLUSH_PORT - IOPORT and size == 4:  # QEMU: 4-byte writes only
                self.flushed.append(value & ~0xFFF)
            return
        shift = 8 * offset
        mask = ((1 << (8 * size)) - 1) << shift & 0xFFFFFFFF
        self.data = self.data & ~mask | value << shift & mask

    def state(self) -> dict:
        return {"data": self.data, "flushed": list(self.flushed)}


class PcTestdevIomem:
    """0xff000000: 64 KiB that read back what was written."""

    def __init__(self, name: str = "pc-testdev-iomem") -> None:
        self.name = name
        self.buffer = bytearray(IOMEM_SIZE)

    def read(self, offset: int, size: int = 1) -> int:
        return int.from_bytes(self.buffer[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, value: int, size: int = 1) -> None:
        data = value.to_bytes(size, "little")[:IOMEM_SIZE - offset]
        self.buffer[offset:offset + len(data)] = data

    def state(self) -> dict:
        return {"nonzero_bytes": sum(1 for b in self.buffer if b)}


class PcTestdev:
    """Both halves, and where QEMU maps them."""

    def __init__(self) -> None:
        self.ports = PcTestdevPorts()
        self.iomem = PcTestdevIomem()

    def register(self, pio, mmio) -> None:
        pio.register(IOPORT, PORTS_SIZE, self.ports)
        mmio.register(IOMEM_BASE, IOMEM_SIZE, self.iomem)
