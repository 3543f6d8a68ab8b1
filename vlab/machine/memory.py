"""Guest-physical memory: the address map a board builds from RAM, ROM and MMIO holes.

QEMU's `pc_memory_init` allocates guest RAM as ordinary host memory (an anonymous mmap)
and `kvm_set_user_memory_region` hands each backed region's userspace address to KVM as a
memory slot. A ROM is the same kind of memory registered with `KVM_MEM_READONLY`, so guest
writes to it exit as MMIO; a hole has no slot at all, so every guest access exits and a
device model answers it. The host side (loaders, the lab) reads and writes all of it.
"""
from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass, field

import cffi

from vlab.x86 import PAGE_SIZE

_ADDRESS_LIMIT = 1 << 64
# Linux <asm-generic/mman.h> value; Python's mmap module does not export it. It tells the
# kernel not to reserve swap, so a 1 GiB guest costs nothing until its pages are touched.
_MAP_NORESERVE = 0x4000

_ffi = cffi.FFI()


class GuestMemoryError(ValueError):
    """A bad memory layout or an access outside host-backed guest memory."""


def span(gpa: int, size: int) -> str:
    """The range as QEMU's `info mtree` shows it: first and last byte, in hex."""
    return f"0x{gpa:08x}-0x{gpa + size - 1:08x}"


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@dataclass(eq=False, repr=False)
class Region:
    """One entry of the guest-physical map.

    `slot` and `host_address` are exactly what `KVM_SET_USER_MEMORY_REGION` takes
    (`slot`, `userspace_addr`); holes have neither, nor a `view`.
    """
    slot: int | None
    gpa: int
    size: int
    kind: str  # "ram" | "rom" | "mmio"
    name: str
    readonly: bool
    host_address: int | None = None
    view: memoryview | None = field(default=None, repr=False)
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _pin: object = field(default=None, repr=False)  # cffi buffer behind host_address

    def __repr__(self) -> str:
        slot = "-" if self.slot is None else self.slot
        return (f"<Region slot={slot} {self.name!r} {self.kind} {span(self.gpa, self.size)} "
                f"{self.flags}>")

    @property
    def end(self) -> int:
        """First address after the region."""
        return self.gpa + self.size

    @property
    def backed(self) -> bool:
        return self.view is not None

    @property
    def flags(self) -> str:
        if not self.backed:
            return "--"
        return "ro" if self.readonly else "rw"


class GuestMemory:
    """The guest-physical address space: non-overlapping, page-aligned regions."""

    def __init__(self) -> None:
        self._regions: list[Region] = []  # sorted by gpa
        self._next_slot = 0
        self._closed = False

    # -- building the map -------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, name: str = "ram") -> Region:
        """Back [gpa, gpa+size) with zeroed host memory the guest may read and write."""
        return self._add(gpa, size, "ram", name)

    def add_rom(self, gpa: int, data_or_size: bytes | int, name: str = "rom") -> Region:
        """Memory the guest may only read: firmware, option ROMs.

        Given bytes, the region is rounded up to whole pages and starts with them.
        """
        if isinstance(data_or_size, int):
            return self._add(gpa, data_or_size, "rom", name)
        data = bytes(data_or_size)
        size = -(-len(data) // PAGE_SIZE) * PAGE_SIZE
        region = self._add(gpa, size, "rom", name)
        region.view[:len(data)] = data
        return region

    def add_mmio(self, gpa: int, size: int, name: str = "mmio") -> Region:
        """Reserve a hole with no host memory: every guest access to it is an MMIO exit."""
        return self._add(gpa, size, "mmio", name)

    def _add(self, gpa: int, size: int, kind: str, name: str) -> Region:
        self._check_open()
        what = f"{kind} region {name!r}"
        if not isinstance(gpa, int) or not isinstance(size, int):
            raise GuestMemoryError(f"{what}: address and size must be integers")
        if gpa < 0:
            raise GuestMemoryError(f"{what}: negative address {gpa:#x}")
        if size <= 0:
            raise GuestMemoryError(f"{what} at 0x{gpa:08x}: size must be positive, got {size}")
        if gpa + size > _ADDRESS_LIMIT:
            raise GuestMemoryError(f"{what} at 0x{gpa:08x} with size {size:#x} "
                                   "runs past the end of the 64-bit address space")
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(f"{what} {span(gpa, size)}: address and size must be "
                                   f"multiples of the {PAGE_SIZE}-byte page (KVM maps pages)")
        if any(r.name == name for r in self._regions):
            raise GuestMemoryError(f"{what}: the name {name!r} is already used")
        for other in self._regions:
            if gpa < other.end and other.gpa < gpa + size:
                raise GuestMemoryError(f"{what} {span(gpa, size)} overlaps {other.kind} "
                                       f"region {other.name!r} {span(other.gpa, other.size)}")
        region = Region(slot=None, gpa=gpa, size=size, kind=kind, name=name,
                        readonly=kind == "rom")
        if kind != "mmio":
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            pin = _ffi.from_buffer(mm)
            region.slot, self._next_slot = self._next_slot, self._next_slot + 1
            region.host_address = int(_ffi.cast("uintptr_t", pin))
            region.view, region._mmap, region._pin = memoryview(mm), mm, pin
        bisect.insort(self._regions, region, key=lambda r: r.gpa)
        return region

    # -- looking things up ------------------------------------------------------------

    @property
    def regions(self) -> tuple[Region, ...]:
        """All regions in address order."""
        return tuple(self._regions)

    def find(self, gpa: int) -> Region | None:
        """The region holding `gpa`, or None where nothing is mapped."""
        i = bisect.bisect_right(self._regions, gpa, key=lambda r: r.gpa) - 1
        if i >= 0 and gpa < self._regions[i].end:
            return self._regions[i]
        return None

    def check(self, gpa: int, size: int, what: str = "access") -> Region:
        """The backed region wholly containing [gpa, gpa+size), or a GuestMemoryError why not."""
        self._check_open()
        head = f"{what} of {size} bytes at 0x{gpa:08x}"
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"{head}: address and size must not be negative")
        region = self.find(gpa)
        if region is None:
            raise GuestMemoryError(f"{head}: outside guest memory (no region maps 0x{gpa:08x})")
        if not region.backed:
            raise GuestMemoryError(f"{head}: in MMIO hole {region.name!r} "
                                   f"{span(region.gpa, region.size)}, which no host memory backs")
        if gpa + size > region.end:
            raise GuestMemoryError(f"{head}: crosses the end of {region.kind} region "
                                   f"{region.name!r} {span(region.gpa, region.size)} "
                                   f"by {gpa + size - region.end} bytes")
        return region

    # -- host-side access ---------------------------------------------------------------

    def read(self, gpa: int, size: int) -> bytes:
        region = self.check(gpa, size, "read")
        offset = gpa - region.gpa
        return bytes(region.view[offset:offset + size])

    def write(self, gpa: int, data: bytes) -> None:
        """Copy `data` into guest memory; ROM too, since this is the host's side of it."""
        data = memoryview(data).cast("B")
        region = self.check(gpa, len(data), "write")
        offset = gpa - region.gpa
        region.view[offset:offset + len(data)] = data

    def _read_uint(self, gpa: int, width: int) -> int:
        return int.from_bytes(self.read(gpa, width), "little")

    def _write_uint(self, gpa: int, value: int, width: int) -> None:
        if not 0 <= value < 1 << (8 * width):
            raise GuestMemoryError(f"write at 0x{gpa:08x}: value {value:#x} does not fit "
                                   f"in {8 * width} unsigned bits")
        self.write(gpa, value.to_bytes(width, "little"))

    def read_u8(self, gpa: int) -> int:
        return self._read_uint(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self._read_uint(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self._read_uint(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self._read_uint(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self._write_uint(gpa, value, 1)

    def write_u16(self, gpa: int, value: int) -> None:
        self._write_uint(gpa, value, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        self._write_uint(gpa, value, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        self._write_uint(gpa, value, 8)

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        """A copy of every backed region's contents, keyed by region name."""
        self._check_open()
        return {r.name: bytes(r.view) for r in self._regions if r.backed}

    def restore(self, snapshot: dict[str, bytes]) -> None:
        """Put back what `snapshot()` returned; checks every region before copying any."""
        self._check_open()
        backed = {r.name: r for r in self._regions if r.backed}
        if snapshot.keys() != backed.keys():
            raise GuestMemoryError(f"snapshot holds regions {sorted(snapshot)}, "
                                   f"but this memory has {sorted(backed)}")
        for name, data in snapshot.items():
            if len(data) != backed[name].size:
                raise GuestMemoryError(f"snapshot of {name!r} has {len(data)} bytes, "
                                       f"the region has {backed[name].size}")
        for name, data in snapshot.items():
            backed[name].view[:] = data

    # -- listing --------------------------------------------------------------------------

    def map(self) -> list[dict]:
        """One row per region, in address order (what QEMU's `info mtree` lists)."""
        return [{"slot": r.slot, "start": r.gpa, "end": r.end - 1, "size": r.size,
                 "kind": r.kind, "flags": r.flags, "name": r.name} for r in self._regions]

    def __str__(self) -> str:
        lines = [f"{'slot':>4}  {'range':<37}  {'size':>9}  kind  flags  name"]
        for row in self.map():
            slot = "-" if row["slot"] is None else str(row["slot"])
            rng = f"0x{row['start']:016x}-0x{row['end']:016x}"
            lines.append(f"{slot:>4}  {rng:<37}  {_human(row['size']):>9}  "
                         f"{row['kind']:<4}  {row['flags']:<5}  {row['name']}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<GuestMemory: {len(self._regions)} regions>"

    # -- lifetime -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    def close(self) -> None:
        """Unmap every region now rather than whenever the garbage collector runs.

        Fails, naming the regions, if something still holds a memoryview into them.
        """
        if self._closed:
            return
        held = []
        for region in self._regions:
            if not region.backed:
                continue
            region.view.release()
            _ffi.release(region._pin)
            try:
                region._mmap.close()
            except BufferError:
                held.append(region.name)
        self._closed = True
        if held:
            raise GuestMemoryError(f"regions {held} are still referenced by a memoryview; "
                                   "release it, their memory is freed when it goes away")

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
