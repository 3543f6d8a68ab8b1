"""QEMU's pc-testdev (kvm-unit-tests' device), register by register and on the buses."""
import pytest

from vlab.devices.bus import Bus
from vlab.devices.pc_testdev import IOMEM_BASE, IOMEM_SIZE, PcTestdev


@pytest.fixture
def buses():
    pio, mmio = Bus("pio"), Bus("mmio")
    dev = PcTestdev()
    dev.register(pio, mmio)
    return pio, mmio, dev


def test_the_ioport_register_by_any_width_and_offset(buses):
    pio, _, dev = buses
    pio.write(0xE0, 0x11223344, 4)
    assert pio.read(0xE0, 4) == 0x11223344
    assert [pio.read(0xE0 + k, 1) for k in range(4)] == [0x44, 0x33, 0x22, 0x11]
    assert pio.read(0xE2, 2) == 0x1122
    pio.write(0xE1, 0xAB, 1)
    pio.write(0xE2, 0xCDEF, 2)
    assert pio.read(0xE0, 4) == 0xCDEFAB44 and dev.ports.state()["data"] == 0xCDEFAB44


def test_flush_port_records_four_byte_writes_and_reads_zero(buses):
    pio, _, dev = buses
    pio.write(0xE4, 0x12345678, 4)
    pio.write(0xE4, 0x9000, 2)  # QEMU takes 4-byte writes only
    assert dev.ports.flushed == [0x12345000]
    assert pio.read(0xE4, 4) == 0


def test_iomem_reads_back_bytes_at_any_width(buses):
    _, mmio, dev = buses
    mmio.write(IOMEM_BASE + 0x10, 0x0102030405060708, 8)
    assert mmio.read(IOMEM_BASE + 0x10, 8) == 0x0102030405060708
    assert mmio.read(IOMEM_BASE + 0x13, 2) == 0x0405
    assert mmio.read(IOMEM_BASE + 0x100, 4) == 0
    mmio.write(IOMEM_BASE + IOMEM_SIZE - 2, 0xAABBCCDD, 4)  # cut at the window's end
    assert mmio.read(IOMEM_BASE + IOMEM_SIZE - 2, 2) == 0xCCDD
    assert dev.iomem.state()["nonzero_bytes"] == 10


def test_port_0xe8_is_left_to_isa_debugcon(buses):
    pio, _, _ = buses
    assert pio.find(0xE7) is not None and pio.find(0xE8) is None
