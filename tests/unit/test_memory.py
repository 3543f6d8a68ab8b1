"""Guest memory: layout rules, bounds-checked access, host addresses, snapshots."""
import ctypes
import re

import pytest

from vlab.machine.memory import GuestMemory, GuestMemoryError
from vlab.x86 import PAGE_SIZE


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_ram(0, 0xA0000, "low")
    m.add_rom(0xF0000, b"\xea\x5b\xe0\x00\xf0", "bios")
    m.add_mmio(0xFEE00000, PAGE_SIZE, "lapic")
    m.add_ram(0x100000, 1 << 20, "high")
    yield m
    m.close()


def test_slots_are_numbered_in_order_for_backed_regions_only(mem):
    by_name = {r.name: r for r in mem.regions}
    assert [by_name[n].slot for n in ("low", "bios", "high")] == [0, 1, 2]
    assert by_name["lapic"].slot is None
    assert by_name["lapic"].host_address is None and by_name["lapic"].view is None
    assert [r.gpa for r in mem.regions] == sorted(r.gpa for r in mem.regions)


def test_kinds_and_readonly_flag(mem):
    kinds = {r.name: (r.kind, r.readonly) for r in mem.regions}
    assert kinds == {"low": ("ram", False), "bios": ("rom", True),
                     "lapic": ("mmio", False), "high": ("ram", False)}


def test_rom_from_bytes_is_rounded_to_pages_and_holds_them(mem):
    bios = mem.find(0xF0000)
    assert bios.size == PAGE_SIZE
    assert mem.read(0xF0000, 6) == b"\xea\x5b\xe0\x00\xf0\x00"


def test_host_address_is_the_mmap_kvm_would_be_given(mem):
    high = mem.find(0x100000)
    mem.write(0x100010, b"hello")
    assert ctypes.string_at(high.host_address + 0x10, 5) == b"hello"
    assert high.host_address % PAGE_SIZE == 0


def test_find(mem):
    assert mem.find(0x9FFFF).name == "low"
    assert mem.find(0xA0000) is None
    assert mem.find(0xFEE00800).name == "lapic"
    assert mem.find(0x1FFFFF).name == "high" and mem.find(0x200000) is None


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_uint_helpers_are_little_endian(mem, width):
    value = int.from_bytes(bytes(range(1, width + 1)), "little")
    getattr(mem, f"write_u{8 * width}")(0x1000, value)
    assert mem.read(0x1000, width) == bytes(range(1, width + 1))
    assert getattr(mem, f"read_u{8 * width}")(0x1000) == value


def test_uint_write_refuses_values_that_do_not_fit(mem):
    with pytest.raises(GuestMemoryError, match="does not fit in 16"):
        mem.write_u16(0x1000, 0x10000)
    with pytest.raises(GuestMemoryError):
        mem.write_u8(0x1000, -1)
    assert mem.read(0x1000, 4) == bytes(4)


def test_loader_side_may_write_rom(mem):
    mem.write(0xF0100, b"\x90\x90")
    assert mem.read(0xF0100, 2) == b"\x90\x90"


@pytest.mark.parametrize("gpa, size, why", [
    (0xA0000, 4, r"outside guest memory"),
    (0x200000, 1, r"outside guest memory"),
    (0xFEE00000, 4, r"in MMIO hole 'lapic' 0xfee00000-0xfee00fff"),
    (0x9FFFE, 4, r"crosses the end of ram region 'low' 0x00000000-0x0009ffff by 2 bytes"),
    (0x1FFFFF, 2, r"crosses the end of ram region 'high'"),
])
def test_out_of_bounds_access_names_address_size_and_reason(mem, gpa, size, why):
    before = mem.snapshot()
    with pytest.raises(GuestMemoryError, match=rf"read of {size} bytes at 0x{gpa:08x}: {why}"):
        mem.read(gpa, size)
    with pytest.raises(GuestMemoryError, match=rf"write of {size} bytes at 0x{gpa:08x}: {why}"):
        mem.write(gpa, b"\xff" * size)
    assert mem.snapshot() == before  # nothing written, not even the part that fits


def test_negative_address_or_size_refused(mem):
    with pytest.raises(GuestMemoryError, match="negative"):
        mem.read(-1, 1)
    with pytest.raises(GuestMemoryError, match="negative"):
        mem.read(0, -1)


@pytest.mark.parametrize("gpa, size, message", [
    (0x9F000, 0x2000, r"ram region 'x' 0x0009f000-0x000a0fff overlaps ram region 'low' "
                      r"0x00000000-0x0009ffff"),
    (0xFEE00000, 0x1000, r"overlaps mmio region 'lapic'"),
    (0xEF000, 0x2000, r"overlaps rom region 'bios'"),
    (0x300000, 0, r"size must be positive"),
    (0x300000, -4096, r"size must be positive"),
    (0x300800, 0x1000, r"0x00300800-0x003017ff: address and size must be multiples of the "
                       r"4096-byte page"),
    (0x300000, 0x800, r"multiples of the 4096-byte page"),
    ((1 << 64) - 0x1000, 0x2000, r"past the end of the 64-bit address space"),
    (-0x1000, 0x1000, r"negative address"),
])
def test_bad_layouts_refused(mem, gpa, size, message):
    count = len(mem.regions)
    with pytest.raises(GuestMemoryError, match=message):
        mem.add_ram(gpa, size, "x")
    assert len(mem.regions) == count


def test_duplicate_name_refused(mem):
    with pytest.raises(GuestMemoryError, match="name 'high' is already used"):
        mem.add_ram(0x400000, 0x1000, "high")


def test_error_is_a_value_error():
    assert issubclass(GuestMemoryError, ValueError)


def test_map_rows_and_table(mem):
    rows = mem.map()
    assert rows[0] == {"slot": 0, "start": 0, "end": 0x9FFFF, "size": 0xA0000, "kind": "ram",
                       "flags": "rw", "name": "low"}
    assert [(r["name"], r["flags"]) for r in rows] == [
        ("low", "rw"), ("bios", "ro"), ("high", "rw"), ("lapic", "--")]
    table = str(mem).splitlines()
    assert len(table) == 5
    assert re.search(r"^\s+-\s+0x00000000fee00000-0x00000000fee00fff\s+4 KiB\s+mmio\s+--\s+lapic$",
                     table[4])
    assert "640 KiB" in table[1] and "1 MiB" in table[3]


def test_snapshot_and_restore(mem):
    mem.write(0x100, b"before")
    snap = mem.snapshot()
    assert set(snap) == {"low", "bios", "high"}
    mem.write(0x100, b"after!")
    mem.restore(snap)
    assert mem.read(0x100, 6) == b"before"


def test_restore_checks_everything_before_copying(mem):
    snap = mem.snapshot()
    mem.write(0x100, b"keep")
    bad = dict(snap, high=b"short")
    with pytest.raises(GuestMemoryError, match="snapshot of 'high' has 5 bytes"):
        mem.restore(bad)
    assert mem.read(0x100, 4) == b"keep"
    with pytest.raises(GuestMemoryError, match="snapshot holds regions"):
        mem.restore({"low": snap["low"]})
    assert mem.read(0x100, 4) == b"keep"


def test_close_releases_and_refuses_further_use():
    with GuestMemory() as m:
        region = m.add_ram(0, 0x1000)
    assert region.view is not None
    with pytest.raises(ValueError):
        region.view[0]  # released memoryview
    with pytest.raises(GuestMemoryError, match="closed"):
        m.read(0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        m.add_ram(0x1000, 0x1000, "more")
    m.close()  # twice is harmless


def test_close_names_regions_still_held_by_a_view():
    m = GuestMemory()
    region = m.add_ram(0, 0x1000, "held")
    held = region.view[0:16]
    with pytest.raises(GuestMemoryError, match=r"\['held'\] are still referenced"):
        m.close()
    held.release()


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_one_gib_of_guest_ram_costs_nothing_until_touched():
    before = _rss_kib()
    with GuestMemory() as m:
        m.add_ram(0, 1 << 30, "ram")
        m.write((1 << 30) - 8, b"top byte")  # touching one page costs one page
        grown = _rss_kib() - before
        assert m.read((1 << 30) - 8, 8) == b"top byte"
    assert grown < 50 * 1024, f"RSS grew by {grown} KiB"
