"""KVM's binary statistics fd (KVM_GET_STATS_FD): the kernel's own counters for a VM or vCPU.

These count what KVM handled *inside* the kernel (exits, halt polling, instruction
emulation...), next to the exits that reach userspace. The header and descriptors are read
once; after that a snapshot is one `pread` of the data block and one precompiled unpack,
cheap enough to take on every VM exit.
"""
from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass
from typing import Callable

from .abi import StatType, StatUnit, ffi

_HEADER = ffi.sizeof("struct kvm_stats_header")
_DESC = ffi.sizeof("struct kvm_stats_desc")


@dataclass(frozen=True, slots=True)
class StatDescriptor:
    name: str
    type: StatType
    unit: StatUnit
    exponent: int      # value * 10**exponent is in `unit` (e.g. -9 for nanoseconds)
    size: int          # number of u64 values (more than one for histograms)
    offset: int        # byte offset in the data block
    bucket_size: int

    @property
    def is_histogram(self) -> bool:
        return self.type in (StatType.LINEAR_HIST, StatType.LOG_HIST)


class StatsFd:
    """Reader for one stats fd; owns the fd (closed by close(), or when collected)."""

    def __init__(self, fd: int, owner: str):
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self.owner = owner
        raw = os.pread(fd, _HEADER, 0)
        header = ffi.from_buffer("struct kvm_stats_header *", bytearray(raw))
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0", 1)[0].decode()
        stride = _DESC + header.name_size
        block = os.pread(fd, stride * header.num_desc, header.desc_offset)
        self.descriptors: list[StatDescriptor] = []
        for i in range(header.num_desc):
            chunk = block[i * stride:(i + 1) * stride]
            flags, exponent, size, offset, bucket = struct.unpack_from("<IhHII", chunk)
            name = chunk[_DESC:].split(b"\0", 1)[0].decode()
            self.descriptors.append(StatDescriptor(
                name, StatType(flags & 0xF), StatUnit((flags >> 4) & 0xF), exponent, size,
                offset, bucket))
        self._data_offset = header.data_offset
        length = max((d.offset + 8 * d.size for d in self.descriptors), default=0)
        self._buffer = bytearray(length)
        self._unpack = struct.Struct(f"<{length // 8}Q").unpack_from
        # Scalars map to one slot; histograms keep their buckets together.
        self._slots = [(d.name, d.offset // 8, d.size) for d in self.descriptors]
        self._scalar_names = [d.name for d in self.descriptors if d.size == 1]
        self._scalar_index = [d.offset // 8 for d in self.descriptors if d.size == 1]

    def names(self) -> list[str]:
        return [d.name for d in self.descriptors]

    def read_raw(self) -> tuple[int, ...]:
        """All u64 words of the data block, in one system call."""
        os.preadv(self.fd, [self._buffer], self._data_offset)
        return self._unpack(self._buffer)

    def selector(self, names) -> tuple[tuple[str, ...], Callable[[], tuple[int, ...]]]:
        """A reader of only these scalar counters, for the VM-exit path: one pread of the
        words up to the last one wanted and one unpack that skips the rest. Returns the
        names in the order the reader gives their values."""
        chosen = self._chosen(names)
        layout, position = "<", 0
        for d in chosen:
            layout += f"{d.offset - position}xQ"
            position = d.offset + 8
        unpack, pread = struct.Struct(layout).unpack_from, os.pread
        fd, offset = self.fd, self._data_offset

        def read() -> tuple[int, ...]:
            return unpack(pread(fd, position, offset))
        return tuple(d.name for d in chosen), read

    def _chosen(self, names) -> list[StatDescriptor]:
        wanted = set(names)
        return sorted((d for d in self.descriptors if d.name in wanted and d.size == 1),
                      key=lambda d: d.offset)

    def layout(self, names) -> tuple[tuple[int, ...], int, int, int]:
        """Where `selector(names)`'s reader finds its counters, for a reader in C: the fd,
        the file offset of the bytes that hold them all, how many bytes those are, and each
        counter's offset in them (in the selector's order)."""
        offsets = tuple(d.offset for d in self._chosen(names))
        first = min(offsets, default=0)
        return (tuple(o - first for o in offsets), self.fd, self._data_offset + first,
                max(offsets, default=first - 8) + 8 - first)

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Every statistic by name; histograms as tuples of bucket counts."""
        words = self.read_raw()
        return {name: words[i] if size == 1 else tuple(words[i:i + size])
                for name, i, size in self._slots}

    def scalars(self, words: tuple[int, ...]) -> dict[str, int]:
        """The scalar counters from a `read_raw()` result."""
        return dict(zip(self._scalar_names, (words[i] for i in self._scalar_index)))

    def delta(self, before: tuple[int, ...], after: tuple[int, ...]) -> dict[str, int]:
        """Scalar counters that changed between two `read_raw()` results."""
        return {name: after[i] - before[i]
                for name, i in zip(self._scalar_names, self._scalar_index)
                if after[i] != before[i]}

    def close(self) -> None:
        self._finalizer()
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
