"""The one thing every device is to a bus."""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Device(Protocol):
    """What a bus needs from a device: QEMU's `MemoryRegionOps` read/write pair, by offset."""

    name: str

    def read(self, offset: int, size: int = 1) -> int:
        """Value of `size` bytes at `offset` within the device's range (may have effects)."""
        ...

    def write(self, offset: int, value: int, size: int = 1) -> None:
        """Store `size` bytes of `value` at `offset` within the device's range."""
        ...

    def state(self) -> dict:
        """A plain snapshot of the registers, without side effects, for views and tests."""
        ...
