"""The lesson MMIO device: each register kind, access-size rules, and MMIO dispatch."""
from __future__ import annotations

import pytest

from vlab.devices import Bus, MmioTestDevice
from vlab.devices.testdev import COUNTER, DOORBELL, ID, MAGIC, SCRATCH


def test_id_register_is_vlab_and_read_only():
    dev = MmioTestDevice()
    assert dev.read(ID, 4) == MAGIC
    assert MAGIC.to_bytes(4, "big") == b"VLAB"
    dev.write(ID, 0, 4)
    assert dev.read(ID, 4) == MAGIC


def test_scratch_stores_32_bits():
    dev = MmioTestDevice()
    dev.write(SCRATCH, 0xDEADBEEF, 4)
    assert dev.read(SCRATCH, 4) == 0xDEADBEEF
    assert dev.read(SCRATCH, 4) == 0xDEADBEEF


def test_counter_counts_its_own_reads_only():
    dev = MmioTestDevice()
    assert [dev.read(COUNTER, 4) for _ in range(3)] == [1, 2, 3]
    dev.read(SCRATCH, 4)
    dev.write(COUNTER, 100, 4)  # read-only
    assert dev.read(COUNTER, 4) == 4
    assert dev.state()["counter"] == 4


def test_doorbell_writes_are_logged_and_passed_on():
    rung: list[int] = []
    dev = MmioTestDevice(on_doorbell=rung.append)
    dev.write(DOORBELL, 7, 4)
    dev.write(DOORBELL, 0x1_0000_0008, 4)
    assert rung == [7, 8]
    assert dev.doorbells == [7, 8]
    assert dev.read(DOORBELL, 4) == 0  # write-only


@pytest.mark.parametrize("offset, size, ones", [
    (SCRATCH, 1, 0xFF), (SCRATCH, 2, 0xFFFF), (SCRATCH, 8, 2**64 - 1),
    (SCRATCH + 2, 4, 0xFFFFFFFF),
])
def test_only_aligned_32_bit_accesses_count(offset, size, ones):
    dev = MmioTestDevice()
    dev.write(SCRATCH, 0x11223344, 4)
    assert dev.read(offset, size) == ones
    dev.write(offset, 0, size)
    assert dev.read(SCRATCH, 4) == 0x11223344
    assert dev.read(COUNTER - 1, 1) == 0xFF
    assert dev.read(COUNTER, 2) == 0xFFFF
    assert dev.state()["counter"] == 0  # refused reads have no side effect


def test_offsets_without_a_register_read_zero():
    assert MmioTestDevice().read(0x10, 4) == 0


def test_behind_the_mmio_bus():
    mmio = Bus("mmio")
    dev = MmioTestDevice()
    mmio.register(0xD000_0000, MmioTestDevice.SIZE, dev)
    assert mmio.read(0xD000_0000, 4) == MAGIC
    mmio.write(0xD000_0004, 0xCAFE, 4)
    assert mmio.dispatch_read(0xD000_0004, 4) == (0xCAFE, dev)
    assert mmio.read(0xD000_0010, 4) == 0  # past the window: nobody, unassigned memory
    assert dev.state() == {"id": MAGIC, "scratch": 0xCAFE, "counter": 0, "doorbells": 0}
