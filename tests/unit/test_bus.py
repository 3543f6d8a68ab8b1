"""The bus: registration rules, dispatch, unclaimed accesses and string port I/O."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vlab.devices import (Bus, BusError, DebugConsole, Device, FwCfg, IsaDebugExit,
                          MmioTestDevice, Uart16550)
from vlab.devices.bus import PIO_DATA_MAX


class Recorder:
    """A device that logs every access and reads back an incrementing value."""

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.log: list[tuple] = []
        self.next_value = 0

    def read(self, offset: int, size: int = 1) -> int:
        self.log.append(("r", offset, size))
        self.next_value += 1
        return self.next_value

    def write(self, offset: int, value: int, size: int = 1) -> None:
        self.log.append(("w", offset, value, size))

    def state(self) -> dict:
        return {"accesses": len(self.log)}


@pytest.fixture
def pio() -> Bus:
    return Bus("pio")


def test_every_device_meets_the_protocol():
    devices = [Uart16550(), DebugConsole(), IsaDebugExit(), MmioTestDevice(),
               FwCfg(ram_size=1 << 20, nb_cpus=1), Recorder()]
    for device in devices:
        assert isinstance(device, Device), device
        assert isinstance(device.state(), dict)


def test_unknown_kind_is_refused():
    with pytest.raises(BusError, match="'isa'"):
        Bus("isa")


def test_find_covers_base_to_last_address(pio):
    dev = Recorder("serial0")
    mapping = pio.register(0x3F8, 8, dev)
    assert (mapping.base, mapping.end, mapping.device) == (0x3F8, 0x400, dev)
    assert pio.find(0x3F8) == (dev, 0)
    assert pio.find(0x3FF) == (dev, 7)
    assert pio.find(0x400) is None
    assert pio.find(0x3F7) is None
    assert pio.find(0) is None


@pytest.mark.parametrize("length", [0, -1])
def test_empty_range_is_refused(pio, length):
    with pytest.raises(BusError, match=rf"serial0: empty range at 0x3f8 \(length {length}\)"):
        pio.register(0x3F8, length, Recorder("serial0"))
    assert pio.mappings() == []


def test_range_past_the_port_space_is_refused(pio):
    with pytest.raises(BusError) as err:
        pio.register(0xFFFF, 2, Recorder("wide"))
    assert "wide [0xffff, 0x10001)" in str(err.value)
    assert "0x10000" in str(err.value)
    pio.register(0xFFFF, 1, Recorder("last"))  # the very last port is fine


def test_range_past_the_physical_space_is_refused():
    mmio = Bus("mmio")
    with pytest.raises(BusError) as err:
        mmio.register(2**64 - 0x1000, 0x1001, Recorder("hi"))
    assert "hi [0xfffffffffffff000, 0x10000000000000001) does not fit" in str(err.value)
    mmio.register(2**64 - 0x1000, 0x1000, Recorder("top"))
    assert mmio.find(2**64 - 1)[1] == 0xFFF


def test_negative_base_is_refused(pio):
    with pytest.raises(BusError, match="does not fit"):
        pio.register(-1, 2, Recorder())


@pytest.mark.parametrize("base, length", [
    (0x3F8, 8),   # same range
    (0x3F0, 9),   # ends on the first port
    (0x3FF, 4),   # starts on the last port
    (0x3FA, 2),   # inside
    (0x300, 0x200),  # around
])
def test_overlap_is_refused_naming_both_devices(pio, base, length):
    pio.register(0x3F8, 8, Recorder("serial0"))
    with pytest.raises(BusError) as err:
        pio.register(base, length, Recorder("intruder"))
    message = str(err.value)
    assert f"intruder [{base:#x}, {base + length:#x})" in message
    assert "serial0 [0x3f8, 0x400)" in message
    assert pio.mappings() == [(0x3F8, 0x400, "serial0")]


def test_adjacent_ranges_are_fine_and_listed_sorted(pio):
    pio.register(0x400, 4, Recorder("after"))
    pio.register(0x3F8, 8, Recorder("serial0"))
    pio.register(0x3F0, 8, Recorder("before"))
    assert pio.mappings() == [(0x3F0, 0x3F8, "before"), (0x3F8, 0x400, "serial0"),
                              (0x400, 0x404, "after")]


def test_unregister_frees_the_range(pio):
    dev = Recorder("serial0")
    pio.register(0x3F8, 8, dev)
    pio.unregister(dev)
    assert pio.find(0x3F8) is None
    assert pio.mappings() == []
    pio.register(0x3F8, 8, Recorder("serial1"))
    with pytest.raises(BusError, match="serial0 is not registered"):
        pio.unregister(dev)


def test_dispatch_passes_offset_value_and_size(pio):
    dev = Recorder()
    pio.register(0x510, 2, dev)
    assert pio.dispatch_write(0x510, 0x19, 2) is dev
    assert pio.dispatch_read(0x511, 1) == (1, dev)
    pio.write(0x511, 0xAB, 1)
    assert pio.read(0x510, 4) == 2
    assert dev.log == [("w", 0, 0x19, 2), ("r", 1, 1), ("w", 1, 0xAB, 1), ("r", 0, 4)]


def test_written_value_is_cut_to_the_access_size(pio):
    dev = Recorder()
    pio.register(0x80, 1, dev)
    pio.write(0x80, 0x1234, 1)
    assert dev.log == [("w", 0, 0x34, 1)]


@pytest.mark.parametrize("size, ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unclaimed_port_reads_all_ones_and_drops_writes(pio, size, ones):
    dev = Recorder()
    pio.register(0x3F8, 8, dev)
    assert pio.dispatch_read(0x2F8, size) == (ones, None)
    assert pio.dispatch_write(0x2F8, 0x41, size) is None
    assert pio.read(0x60, size) == ones
    assert dev.log == []


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unclaimed_mmio_reads_zero_as_qemu_7_2(size):
    """Memory nobody claims reads 0 (QEMU 7.2's unassigned_mem_ops), not the all-ones
    of an unclaimed port."""
    mmio = Bus("mmio")
    assert mmio.dispatch_read(0xFEE00000, size) == (0, None)
    assert "reads 0" in mmio.unassigned and "all-ones" in Bus("pio").unassigned


@pytest.mark.parametrize("kind, size", [("pio", 0), ("pio", 3), ("pio", 8), ("pio", -1),
                                        ("mmio", 16), ("mmio", 5)])
def test_impossible_access_sizes_are_refused(kind, size):
    bus = Bus(kind)
    bus.register(0, 0x100, Recorder())
    with pytest.raises(BusError, match=f"access size {size}"):
        bus.dispatch_read(0x10, size)
    with pytest.raises(BusError, match=f"access size {size}"):
        bus.dispatch_write(0x10, 0, size)


def test_rep_outsb_writes_each_byte(pio):
    dev = Recorder("debugcon")
    pio.register(0xE9, 1, dev)
    assert pio.pio_out(0xE9, 1, 3, b"hi!") is dev
    assert dev.log == [("w", 0, ord("h"), 1), ("w", 0, ord("i"), 1), ("w", 0, ord("!"), 1)]


def test_rep_outsw_unpacks_little_endian(pio):
    dev = Recorder()
    pio.register(0x1F0, 8, dev)
    pio.pio_out(0x1F2, 2, 2, bytes([0x01, 0x02, 0x03, 0x04]))
    assert dev.log == [("w", 2, 0x0201, 2), ("w", 2, 0x0403, 2)]


def test_rep_insw_packs_little_endian(pio):
    dev = Recorder()
    dev.next_value = 0x1233
    pio.register(0x1F0, 8, dev)
    data, claimed = pio.pio_in(0x1F0, 2, 3)
    assert claimed is dev
    assert data == bytes([0x34, 0x12, 0x35, 0x12, 0x36, 0x12])
    assert dev.log == [("r", 0, 2)] * 3


def test_string_io_to_nobody(pio):
    assert pio.pio_in(0x80, 4, 2) == (b"\xff" * 8, None)
    assert pio.pio_out(0x80, 1, 2, b"ab") is None


@pytest.mark.parametrize("size, count, data, message", [
    (1, 0, b"", "count 0"),
    (1, -3, b"", "count -3"),
    (3, 1, b"abc", "access size 3"),
    (8, 1, b"12345678", "access size 8"),
    (2, 2, b"abc", "3 bytes, expected size\\*count = 2\\*2"),
    (1, 2, b"abc", "3 bytes, expected size\\*count = 1\\*2"),
    (4, PIO_DATA_MAX, b"\0" * 4 * PIO_DATA_MAX, "exceeds"),
])
def test_hostile_string_io_is_refused(pio, size, count, data, message):
    dev = Recorder()
    pio.register(0xE9, 1, dev)
    with pytest.raises(BusError, match=message):
        pio.pio_out(0xE9, size, count, data)
    if len(data) == size * count:
        with pytest.raises(BusError, match=message):
            pio.pio_in(0xE9, size, count)
    assert dev.log == []


def test_string_io_is_port_io_only():
    mmio = Bus("mmio")
    with pytest.raises(BusError, match="pio bus"):
        mmio.pio_out(0, 1, 1, b"x")
    with pytest.raises(BusError, match="pio bus"):
        mmio.pio_in(0, 1, 1)


ranges = st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(-2, 0x200)), max_size=30)


@given(requests=ranges, probes=st.lists(st.integers(0, 0xFFFF), max_size=50))
def test_bus_agrees_with_a_brute_force_address_map(requests, probes):
    bus = Bus("pio")
    owner: dict[int, tuple[Recorder, int]] = {}
    for n, (base, length) in enumerate(requests):
        dev = Recorder(f"d{n}")
        span = range(base, base + length)
        legal = length > 0 and base + length <= 0x10000 and not any(a in owner for a in span)
        if legal:
            bus.register(base, length, dev)
            owner.update((a, (dev, a - base)) for a in span)
        else:
            with pytest.raises(BusError):
                bus.register(base, length, dev)
    for addr in probes + [base for base, _ in requests]:
        assert bus.find(addr) == owner.get(addr)
    listed = bus.mappings()
    assert listed == sorted(listed)
    assert sum(end - base for base, end, _ in listed) == len(owner)
