"""Put guest code into guest memory: a raw image at an address, or an ELF executable.

A raw image is what a boot sector or a cell of assembly is: bytes and the address they
run at. An ELF executable says for itself where its pieces go: QEMU's `load_elf` copies
each PT_LOAD segment to its physical address (`p_paddr`), zero-fills the part of memory
the file does not supply (`.bss`, `p_memsz > p_filesz`) and reports the entry point.

Every loader checks all of its segments against the memory map before copying any, so
a bad image leaves guest memory exactly as it was.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlab.machine.memory import GuestMemory, GuestMemoryError, span

_X86_MACHINES = ("EM_386", "EM_X86_64")
_ELF_HEADER_SIZE = {1: 52, 2: 64}  # by EI_CLASS


class LoadError(ValueError):
    """A guest image that is malformed or does not fit the guest's memory."""


@dataclass(frozen=True)
class ImageSegment:
    """Bytes bound for guest memory: `data` at `gpa`, then zeros up to `memsz` bytes."""
    name: str
    gpa: int
    data: bytes
    memsz: int


@dataclass
class LoadedImage:
    """What a loader put where: `segments` are (guest address, size in memory) pairs."""
    entry: int
    segments: list[tuple[int, int]]
    format: str  # "raw", "elf", ...
    elf_class: int | None = None  # 32 or 64, for ELF
    machine: str | None = None  # ELF e_machine, e.g. "EM_386"

    def summary(self) -> str:
        kind = f"ELF{self.elf_class} {self.machine}" if self.format == "elf" else self.format
        lines = [f"{kind} image, entry 0x{self.entry:08x}"]
        lines += [f"  {span(gpa, size)}  {size} bytes" for gpa, size in self.segments if size]
        return "\n".join(lines)


@dataclass(frozen=True)
class ElfImage:
    """An ELF executable, parsed and checked, not yet in guest memory."""
    entry: int
    elf_class: int
    machine: str
    segments: list[ImageSegment] = field(repr=False)


def read_image(image: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    """Image bytes, from bytes or from a file path."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise LoadError(f"an image is bytes or a file path, not {type(image).__name__} "
                        f"{image!r}")  # bytes(12345) would be 12345 zero bytes
    return bytes(image)


def place(memory: GuestMemory, segments: list[ImageSegment]) -> None:
    """Copy segments into guest memory after checking that all fit and none overlap."""
    present = sorted((s for s in segments if s.memsz), key=lambda s: s.gpa)
    for seg in present:
        try:
            memory.check(seg.gpa, seg.memsz, "load")
        except GuestMemoryError as e:
            raise LoadError(f"{seg.name} does not fit: {e}") from e
    for low, high in zip(present, present[1:]):
        if high.gpa < low.gpa + low.memsz:
            raise LoadError(f"{low.name} {span(low.gpa, low.memsz)} overlaps "
                            f"{high.name} {span(high.gpa, high.memsz)}")
    for seg in present:
        memory.write(seg.gpa, seg.data)
        if seg.memsz > len(seg.data):
            memory.write(seg.gpa + len(seg.data), bytes(seg.memsz - len(seg.data)))


def load_raw(memory: GuestMemory, gpa: int, data: bytes) -> LoadedImage:
    """Copy flat code to `gpa`, which is also where it starts running."""
    data = bytes(data)
    if not data:
        raise LoadError(f"the image is empty: no code to load at {gpa:#x}, nothing to run")
    place(memory, [ImageSegment("raw image", gpa, data, len(data))])
    return LoadedImage(entry=gpa, segments=[(gpa, len(data))], format="raw")


def _elf_header(data: bytes) -> None:
    """Refuse what is not even shaped like an ELF file, before pyelftools reads it."""
    if data[:4] != b"\x7fELF":
        raise LoadError("not an ELF image: it does not start with the bytes 7f 45 4c 46 "
                        f"('\\x7fELF'), it starts with {data[:4].hex(' ') or 'nothing'}")
    need = _ELF_HEADER_SIZE.get(data[4] if len(data) > 4 else 0)
    if need is None:
        raise LoadError("malformed ELF image: byte 4 (EI_CLASS) must be 1 (32-bit) or "
                        "2 (64-bit)")
    if len(data) < need:
        raise LoadError(f"truncated ELF image: the ELF header needs {need} bytes, "
                        f"the image has {len(data)}")


def parse_elf(image: bytes | str | os.PathLike) -> ElfImage:
    """Read an x86 ELF executable's entry point and PT_LOAD segments, checking each."""
    from elftools.common.exceptions import ELFError  # imported here: `vlab run` of a flat
    from elftools.elf.elffile import ELFFile         # image should not pay for pyelftools
    data = read_image(image)
    _elf_header(data)
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
        table_end = header["e_phoff"] + header["e_phnum"] * header["e_phentsize"]
        if table_end > len(data):
            raise LoadError(f"truncated ELF image: its {header['e_phnum']} program headers "
                            f"end at byte {table_end}, the image has {len(data)}")
        phdrs = [seg.header for seg in elf.iter_segments()]
    except ELFError as e:
        raise LoadError(f"malformed ELF image: {e}") from e
    if header["e_machine"] not in _X86_MACHINES:
        raise LoadError(f"ELF image built for {header['e_machine']}; x86 guests need "
                        "EM_386 or EM_X86_64")
    if header["e_type"] == "ET_REL":
        raise LoadError("ELF object file (ET_REL), not an executable: link it first (ld)")
    if header["e_type"] == "ET_DYN":
        raise LoadError("position-independent ELF (ET_DYN): it has no fixed load address; "
                        "link with -no-pie (or -static)")
    if header["e_type"] != "ET_EXEC":
        raise LoadError(f"ELF type {header['e_type']} is not an executable (ET_EXEC)")
    segments = []
    for index, ph in enumerate(phdrs):
        if ph["p_type"] != "PT_LOAD":
            continue
        name = f"ELF segment {index} (PT_LOAD at 0x{ph['p_paddr']:08x})"
        if ph["p_filesz"] > ph["p_memsz"]:
            raise LoadError(f"{name}: p_filesz {ph['p_filesz']:#x} exceeds p_memsz "
                            f"{ph['p_memsz']:#x}")
        end = ph["p_offset"] + ph["p_filesz"]
        if end > len(data):
            raise LoadError(f"{name}: its file bytes {ph['p_offset']:#x}-{end:#x} lie beyond "
                            f"the end of the image ({len(data):#x} bytes): truncated?")
        segments.append(ImageSegment(name, ph["p_paddr"], data[ph["p_offset"]:end], ph["p_memsz"]))
    if not segments:
        raise LoadError("ELF image has no PT_LOAD segment: nothing to load")
    return ElfImage(entry=header["e_entry"], elf_class=elf.elfclass,
                    machine=header["e_machine"], segments=segments)


def load_elf(memory: GuestMemory, image: bytes | str | os.PathLike) -> LoadedImage:
    """Load an ELF executable at its physical addresses, as QEMU's `load_elf` does; one
    whose entry point is outside guest RAM is refused (it could not start)."""
    elf = parse_elf(image)
    region = memory.find(elf.entry)
    if region is None or not region.backed:
        where = "" if region is None else f" (in the MMIO hole {region.name!r})"
        raise LoadError(f"the ELF image's entry point 0x{elf.entry:08x} is outside guest "
                        f"RAM{where}: the guest could not start there; link it to run in RAM")
    place(memory, elf.segments)
    return LoadedImage(entry=elf.entry, segments=[(s.gpa, s.memsz) for s in elf.segments],
                       format="elf", elf_class=elf.elf_class, machine=elf.machine)
