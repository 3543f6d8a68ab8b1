"""The address map: which device answers a port or a guest-physical address.

QEMU keeps two address spaces for an x86 machine, `address_space_io` (16-bit port space,
reached by IN/OUT) and `address_space_memory` (64-bit guest-physical space, where MMIO lives),
and routes each KVM exit through a flat view of the regions mapped into them
(`kvm_handle_io` -> `address_space_rw`; `flatview_translate` for MMIO). Firecracker and
rust-vmm's vm-device do the same with a `Bus` holding sorted ranges. A `Bus` here is one such
space: `Bus("pio")` for ports, `Bus("mmio")` for guest-physical addresses.

Ranges are half-open, `[base, end)`, as Python's `range(base, end)`. The bus refuses empty,
overflowing and overlapping ranges when a device is registered, so a mistake in the board
surfaces at setup rather than as a mysterious guest hang. Lookups bisect a sorted list of
bases: O(log n) per VM exit, after a check of the mapping the last access hit (a guest
tends to talk to one device many times in a row). An access is routed by its first address; a device sees
`offset + size` past its end only if the guest straddles two devices, which real hardware
does not promise to handle either.

Everything the guest controls (address, size, count, data) is validated here, because it
arrives straight from a VM exit.

An access nobody claims behaves as in QEMU 7.2: a write is dropped; a port read returns
all-ones (`unassigned_io_ops`, the floating ISA bus), but a memory read returns 0
(`unassigned_mem_ops`). `Bus.unassigned` names this for the exit trace, where an
unclaimed read's device column says what the guest got back.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

from vlab.devices.device import Device

# KVM copies string I/O data through one page of the vCPU's shared area (`pio_data`), so a
# single exit never carries more than this many bytes.
PIO_DATA_MAX = 4096

_SPACES = {
    # kind: (size of the space, access sizes the CPU can produce)
    "pio": (1 << 16, (1, 2, 4)),
    "mmio": (1 << 64, (1, 2, 4, 8)),
}

_ALL_ONES = {size: (1 << (8 * size)) - 1 for size in (1, 2, 4, 8)}
# What an unclaimed read returns, per access size, and how the trace says so.
_UNASSIGNED = {
    "pio": (_ALL_ONES, "unassigned: reads all-ones (QEMU's unassigned_io_ops)"),
    "mmio": (dict.fromkeys(_ALL_ONES, 0), "unassigned: reads 0 (QEMU's unassigned_mem_ops)"),
}


class BusError(ValueError):
    """A bad registration, or an access the guest could not legitimately have made."""


class Mapping(NamedTuple):
    """One device's window in the space: addresses `base <= addr < end`."""
    base: int
    end: int
    device: Device

    def __str__(self) -> str:
        return f"{self.device.name} [{self.base:#x}, {self.end:#x})"


class Bus:
    """One address space (`kind` is "pio" or "mmio") and the devices mapped into it."""

    def __init__(self, kind: str) -> None:
        if kind not in _SPACES:
            raise BusError(f"bus kind must be 'pio' or 'mmio', not {kind!r}")
        self.kind = kind
        self.limit, self.access_sizes = _SPACES[kind]
        self._unassigned_value, self.unassigned = _UNASSIGNED[kind]
        self._bases: list[int] = []
        self._maps: list[Mapping] = []
        self._last = Mapping(0, 0, None)  # the mapping of the last hit; none yet

    # -- the address map ----------------------------------------------------------------

    def register(self, base: int, length: int, device: Device) -> Mapping:
        """Map `device` at `[base, base + length)`; the device then sees offsets from 0."""
        name = getattr(device, "name", repr(device))
        if length <= 0:
            raise BusError(f"{name}: empty range at {base:#x} (length {length})")
        new = Mapping(base, base + length, device)
        if base < 0 or new.end > self.limit:
            raise BusError(f"{new} does not fit the {self.kind} space "
                           f"[0x0, {self.limit:#x})")
        i = bisect_right(self._bases, base)
        for neighbour in self._maps[max(i - 1, 0):i + 1]:
            if neighbour.base < new.end and base < neighbour.end:
                raise BusError(f"{new} overlaps {neighbour}")
        self._bases.insert(i, base)
        self._maps.insert(i, new)
        return new

    def unregister(self, device: Device) -> None:
        """Remove every mapping of `device`."""
        keep = [m for m in self._maps if m.device is not device]
        if len(keep) == len(self._maps):
            raise BusError(f"{device.name} is not registered on this {self.kind} bus")
        self._maps = keep
        self._bases = [m.base for m in keep]
        self._last = Mapping(0, 0, None)

    def mappings(self) -> list[tuple[int, int, str]]:
        """`(base, end, device name)` for every mapping, by address."""
        return [(m.base, m.end, m.device.name) for m in self._maps]

    def find(self, addr: int) -> tuple[Device, int] | None:
        """The device claiming `addr` and the offset into it, or None."""
        m = self._last
        if m.base <= addr < m.end:
            return m.device, addr - m.base
        i = bisect_right(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                self._last = m
                return m.device, addr - m.base
        return None

    # -- single accesses ------------------------------------------------------------------

    def dispatch_read(self, addr: int, size: int) -> tuple[int, Device | None]:
        """Read `size` bytes; an unclaimed read gives the space's unassigned value (ports:
        all-ones, memory: 0)."""
        self._check_size(size)
        hit = self.find(addr)
        if hit is None:
            return self._unassigned_value[size], None
        device, offset = hit
        return device.read(offset, size), device

    def dispatch_write(self, addr: int, value: int, size: int) -> Device | None:
        """Write `size` bytes; an unclaimed write is dropped. Returns the device, if any."""
        self._check_size(size)
        hit = self.find(addr)
        if hit is None:
            return None
        device, offset = hit
        device.write(offset, value & _ALL_ONES[size], size)
        return device

    def read(self, addr: int, size: int) -> int:
        return self.dispatch_read(addr, size)[0]

    def write(self, addr: int, value: int, size: int) -> None:
        self.dispatch_write(addr, value, size)

    # -- string port I/O, as KVM_EXIT_IO reports it ---------------------------------------

    def pio_out(self, port: int, size: int, count: int, data: bytes) -> Device | None:
        """`rep outs`: `count` writes of `size` bytes each, packed little-endian in `data`."""
        if count == 1 and size in self.access_sizes and len(data) == size and self.kind == "pio":
            # A plain OUT, the common case on the VM-exit path: one lookup, one write.
            hit = self.find(port)
            if hit is None:
                return None
            device, offset = hit
            device.write(offset, int.from_bytes(data, "little"), size)
            return device
        self._check_string_io(size, count)
        if len(data) != size * count:
            raise BusError(f"string I/O data is {len(data)} bytes, "
                           f"expected size*count = {size}*{count}")
        hit = self.find(port)
        if hit is None:
            return None
        device, offset = hit
        for i in range(0, size * count, size):
            device.write(offset, int.from_bytes(data[i:i + size], "little"), size)
        return device

    def pio_in(self, port: int, size: int, count: int) -> tuple[bytes, Device | None]:
        """`rep ins`: `count` reads of `size` bytes each, packed little-endian."""
        self._check_string_io(size, count)
        hit = self.find(port)
        if hit is None:
            return b"\xff" * (size * count), None
        device, offset = hit
        return b"".join(device.read(offset, size).to_bytes(size, "little")
                        for _ in range(count)), device

    # -- validation of guest-supplied values ----------------------------------------------

    def _check_size(self, size: int) -> None:
        if size not in self.access_sizes:
            raise BusError(f"access size {size!r} is not one of {self.access_sizes} "
                           f"on the {self.kind} bus")

    def _check_string_io(self, size: int, count: int) -> None:
        if self.kind != "pio":
            raise BusError("string I/O (rep ins/outs) exists only on the pio bus")
        self._check_size(size)
        if not isinstance(count, int) or count < 1:
            raise BusError(f"string I/O count {count!r} must be at least 1")
        if size * count > PIO_DATA_MAX:
            raise BusError(f"string I/O of {count} x {size} bytes exceeds KVM's "
                           f"{PIO_DATA_MAX}-byte pio_data page")
