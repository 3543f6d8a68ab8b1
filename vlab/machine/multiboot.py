"""Boot a Multiboot (v1) kernel the way QEMU's `-kernel` does (hw/i386/multiboot.c).

A Multiboot kernel carries a header in its first 8 KiB: magic 0x1BADB002, feature flags,
and a checksum making the three sum to zero. The boot loader loads the kernel (at the
addresses the header's "a.out kludge" fields give when flag bit 16 is set, else as an
ELF file), places modules after it, and writes a *multiboot information* structure that
tells the kernel its memory map, command line and modules. It then enters the kernel in
32-bit protected mode with EAX = 0x2BADB002 and EBX = the structure's address.

QEMU does this in `load_multiboot` and hands the result to a small option ROM; here the
same layout is written straight into guest memory. Everything is checked before any
byte is written.

Where the information goes: QEMU's option ROM builds the structure and the memory map at
0x9000 (MULTIBOOT_STRUCT_ADDR) and keeps the command lines, the module list and the boot
loader's name in a block right after the kernel's last page, modules after that. Here the
whole information block goes to 0x9000 when the kernel leaves that free, and otherwise
right after the kernel, where QEMU keeps the rest of it (a kernel loaded over 0x9000 would
overwrite QEMU's copy: here it gets one that is intact). What cannot be placed at all is
refused: a kernel over the reserved hole below 1 MiB, or no room left after the kernel.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vlab.machine.loaders import (LoadedImage, LoadError, ImageSegment, parse_elf, place,
                                  read_image)
from vlab.machine.memory import GuestMemory, GuestMemoryError, span
from vlab.x86 import PAGE_SIZE

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002  # EAX at kernel entry
SEARCH_LIMIT = 8192  # the header lies wholly within the image's first 8 KiB

# Header flags. Bits 0-15 are requirements: a loader must refuse those it cannot honour.
PAGE_ALIGN = 1 << 0  # modules on 4 KiB boundaries
MEMORY_INFO = 1 << 1  # mem_* fields and the memory map
VIDEO_MODE = 1 << 2  # a graphics mode request
AOUT_KLUDGE = 1 << 16  # load addresses are in the header, not in an ELF file
_HONOURED = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE  # video: accepted but ignored, as QEMU does

# Information structure: which fields are valid (`flags`), and their offsets.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_SIZE = 88  # through the VBE fields, as QEMU's MBI_SIZE
MMAP_ENTRY = struct.Struct("<IQQI")  # size (of the rest: 20), base_addr, length, type
MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
MEMORY_AVAILABLE, MEMORY_RESERVED = 1, 2

INFO_ADDRESS = 0x9000  # QEMU's MULTIBOOT_STRUCT_ADDR, when the kernel leaves it free
LOW_MEMORY_END = 0x9FC00  # start of the extended BIOS data area: 639 KiB usable below
HIGH_MEMORY = 0x100000
BOOTLOADER_NAME = "vlab"


class MultibootError(LoadError):
    """An image that is not a bootable Multiboot kernel, or that does not fit."""


@dataclass(frozen=True)
class MultibootHeader:
    """The kernel's Multiboot header; the address fields only with the a.out kludge.

    `text_offset` and `load_size` say which file bytes the kludge fields select.
    """
    offset: int
    flags: int
    checksum: int
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None
    text_offset: int | None = None
    load_size: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def kludge(self) -> bool:
        return bool(self.flags & AOUT_KLUDGE)


@dataclass
class MultibootBoot:
    """Where everything went, and the register values the kernel must be entered with."""
    entry: int
    eax: int
    ebx: int
    header: MultibootHeader
    kernel: LoadedImage
    modules: list[tuple[str, int, int]]  # name, start, end (exclusive)
    cmdline: str
    mem_lower: int  # KiB
    mem_upper: int  # KiB
    mmap: list[tuple[int, int, int]]  # base, length, type
    info_flags: int

    def summary(self) -> str:
        how = "a.out kludge" if self.header.kludge else f"ELF{self.kernel.elf_class}"
        lines = [f"multiboot kernel ({how}), entry 0x{self.entry:08x}"]
        lines += [f"  kernel  {span(gpa, size)}" for gpa, size in self.kernel.segments if size]
        lines += [f"  module  {span(start, end - start)}  {name}"
                  for name, start, end in self.modules]
        lines.append(f"  info    0x{self.ebx:08x}  flags {self.info_flags:#x}, mem_lower "
                     f"{self.mem_lower} KiB, mem_upper {self.mem_upper} KiB, "
                     f"cmdline {self.cmdline!r}")
        names = {MEMORY_AVAILABLE: "available", MEMORY_RESERVED: "reserved"}
        lines += [f"  mmap    {span(base, length)}  {names[kind]}"
                  for base, length, kind in self.mmap]
        lines += [f"  note: {note}" for note in self.header.notes]
        lines.append(f"  enter in 32-bit protected mode with eax=0x{self.eax:08x} "
                     f"ebx=0x{self.ebx:08x}")
        return "\n".join(lines)


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "little")


def _find_header(data: bytes) -> tuple[int, int, int]:
    """Offset, flags and checksum of the first valid header (QEMU's search loop)."""
    bad = None
    for offset in range(0, min(SEARCH_LIMIT, len(data)) - 11, 4):
        if _u32(data, offset) != HEADER_MAGIC:
            continue
        flags, checksum = _u32(data, offset + 4), _u32(data, offset + 8)
        if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags, checksum
        bad = bad or (offset, flags, checksum)
    if bad is None:
        raise MultibootError(f"no Multiboot header: the magic {HEADER_MAGIC:#010x} is not in "
                             f"the first {SEARCH_LIMIT} bytes at a 4-byte-aligned offset")
    offset, flags, checksum = bad
    total = (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF
    right = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
    raise MultibootError(f"Multiboot header at offset {offset:#x} has a bad checksum "
                         f"{checksum:#010x}: magic + flags + checksum = {total:#010x}, must be "
                         f"0 mod 2^32 (the checksum should be {right:#010x})")


def _kludge_fields(data: bytes, offset: int) -> dict[str, int]:
    """Read and cross-check the a.out kludge address fields (flag bit 16)."""
    if offset + 32 > min(SEARCH_LIMIT, len(data)):
        raise MultibootError(f"Multiboot header at offset {offset:#x} sets flag bit 16 but "
                             "its five address fields (32 bytes in all) are cut off")
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = (
        _u32(data, offset + 12 + 4 * i) for i in range(5))
    if load_addr > header_addr:
        raise MultibootError(f"load_addr {load_addr:#x} is above header_addr {header_addr:#x}: "
                             "the header must be part of what is loaded")
    text_offset = offset - (header_addr - load_addr)
    if text_offset < 0:
        raise MultibootError(f"header_addr - load_addr = {header_addr - load_addr:#x}, but the "
                             f"header is only {offset:#x} bytes into the file: load_addr "
                             "would fall before the file's first byte")
    if load_end_addr == 0:
        load_size = len(data) - text_offset
    elif load_end_addr <= header_addr:
        raise MultibootError(f"load_end_addr {load_end_addr:#x} is not above header_addr "
                             f"{header_addr:#x}: the header must be part of what is loaded")
    else:
        load_size = load_end_addr - load_addr
        if text_offset + load_size > len(data):
            raise MultibootError(f"load_end_addr {load_end_addr:#x} asks for {load_size:#x} bytes "
                                 f"from file offset {text_offset:#x}, but the file has only "
                                 f"{len(data):#x} bytes")
    if bss_end_addr and bss_end_addr < load_addr + load_size:
        raise MultibootError(f"bss_end_addr {bss_end_addr:#x} is below the end of the loaded "
                             f"text {load_addr + load_size:#x}")
    if not load_addr <= entry_addr < load_addr + load_size:
        raise MultibootError(f"entry_addr {entry_addr:#x} is outside the loaded text "
                             f"{span(load_addr, load_size)}")
    return dict(header_addr=header_addr, load_addr=load_addr, load_end_addr=load_end_addr,
                bss_end_addr=bss_end_addr, entry_addr=entry_addr, text_offset=text_offset,
                load_size=load_size)


def parse_header(image: bytes | str | os.PathLike) -> MultibootHeader:
    """Find and check the Multiboot header of a kernel image."""
    data = read_image(image)
    offset, flags, checksum = _find_header(data)
    unknown = flags & 0xFFFF & ~_HONOURED
    if unknown:
        bits = ", ".join(str(b) for b in range(16) if unknown >> b & 1)
        raise MultibootError(f"the kernel requires Multiboot features this loader lacks: "
                             f"flag bits {bits} (flags {flags:#010x})")
    notes = ()
    if flags & VIDEO_MODE:
        notes = ("the kernel asks for a video mode (flag bit 2); there is no framebuffer, "
                 "so the request is ignored, as QEMU ignores it",)
    fields = _kludge_fields(data, offset) if flags & AOUT_KLUDGE else {}
    return MultibootHeader(offset=offset, flags=flags, checksum=checksum, notes=notes, **fields)


def _kernel(data: bytes, header: MultibootHeader) -> tuple[LoadedImage, list[ImageSegment]]:
    if header.kludge:
        end = header.bss_end_addr or header.load_addr + header.load_size
        text = data[header.text_offset:header.text_offset + header.load_size]
        seg = ImageSegment("kernel", header.load_addr, text, end - header.load_addr)
        image = LoadedImage(entry=header.entry_addr, segments=[(seg.gpa, seg.memsz)],
                            format="a.out kludge")
        return image, [seg]
    try:
        elf = parse_elf(data)
    except LoadError as e:
        raise MultibootError(f"the kernel sets no a.out kludge (flag bit 16), so it must be an "
                             f"ELF executable, but: {e}") from e
    if elf.elf_class != 32:
        raise MultibootError("Multiboot v1 loads 32-bit ELF kernels; this one is ELF64 "
                             "(give it an a.out kludge header, or link it as elf32)")
    image = LoadedImage(entry=elf.entry, segments=[(s.gpa, s.memsz) for s in elf.segments],
                        format="elf", elf_class=32, machine=elf.machine)
    return image, list(elf.segments)


def _ram_end(memory: GuestMemory, ram_size: int | None) -> int:
    """End of the RAM the memory map reports, checked against what actually backs it."""
    if ram_size is None:
        region = memory.find(HIGH_MEMORY)
        if region is None or region.kind != "ram":
            raise MultibootError("no RAM at 1 MiB (0x100000), where Multiboot's upper memory "
                                 "starts")
        ram_size = region.end
    if ram_size <= HIGH_MEMORY:
        raise MultibootError(f"ram_size {ram_size:#x} leaves no memory above 1 MiB")
    for base, end in ((0, LOW_MEMORY_END), (HIGH_MEMORY, ram_size)):
        try:
            memory.check(base, end - base, "the memory map's available range")
        except GuestMemoryError as e:
            raise MultibootError(f"the memory map would promise RAM that is not there: {e}") from e
    return ram_size


def memory_map(ram_end: int) -> list[tuple[int, int, int]]:
    """(base, length, type) of a PC's RAM as its BIOS reports it (e820, also Linux's zero
    page): the 639 KiB below the EBDA and the RAM from 1 MiB available; the EBDA and the
    BIOS area reserved; VGA memory and the option ROMs in between not listed at all."""
    return [(0, LOW_MEMORY_END, MEMORY_AVAILABLE),
            (LOW_MEMORY_END, 0xA0000 - LOW_MEMORY_END, MEMORY_RESERVED),
            (0xF0000, HIGH_MEMORY - 0xF0000, MEMORY_RESERVED),
            (HIGH_MEMORY, ram_end - HIGH_MEMORY, MEMORY_AVAILABLE)]


def _cstring(text: str, what: str) -> bytes:
    if "\0" in text:
        raise MultibootError(f"{what} {text!r} contains a NUL byte, which would end it early")
    return text.encode() + b"\0"


def _information(base: int, flags: int, mem_lower: int, mem_upper: int,
                 mmap: list[tuple[int, int, int]], modules: list[tuple[str, int, int]],
                 cmdline: str) -> bytes:
    """The bytes at `base`: the structure, the memory map, the module list, strings."""
    mmap_addr = base + INFO_SIZE
    mods_addr = mmap_addr + MMAP_ENTRY.size * len(mmap)
    string_base = mods_addr + MODULE_ENTRY.size * len(modules)
    strings = bytearray()

    def add_string(text: str, what: str) -> int:
        address = string_base + len(strings)
        strings.extend(_cstring(text, what))
        return address

    cmdline_addr = add_string(cmdline, "cmdline")
    name_addr = add_string(BOOTLOADER_NAME, "boot loader name")
    module_table = b"".join(MODULE_ENTRY.pack(start, end, add_string(name, "module name"), 0)
                            for name, start, end in modules)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<IIIIIII", info, 0, flags, mem_lower, mem_upper, 0,
                     cmdline_addr, len(modules), mods_addr)
    struct.pack_into("<II", info, 44, MMAP_ENTRY.size * len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    mmap_table = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, *entry) for entry in mmap)
    return bytes(info) + mmap_table + module_table + bytes(strings)


def _page_up(address: int) -> int:
    return -(-address // PAGE_SIZE) * PAGE_SIZE


def _following(cursor: int, size: int) -> int:
    """The first page at or after `cursor` where `size` bytes stay clear of the reserved
    hole below 1 MiB (a low kernel's followers that do not fit below it go to 1 MiB)."""
    start = _page_up(cursor)
    if start < HIGH_MEMORY and start + size > LOW_MEMORY_END:
        return HIGH_MEMORY
    return start


def _info_address(segments: list[ImageSegment], size: int) -> int:
    """INFO_ADDRESS if the block fits there below the EBDA without touching the kernel;
    else the first page after the kernel."""
    end = INFO_ADDRESS + size
    if end <= LOW_MEMORY_END and not any(s.gpa < end and INFO_ADDRESS < s.gpa + s.memsz
                                         for s in segments if s.memsz):
        return INFO_ADDRESS
    return _following(max(s.gpa + s.memsz for s in segments), size)


def _check_reserved(segments: list[ImageSegment]) -> None:
    """The kernel may use any RAM the memory map reports available, nothing else."""
    for seg in segments:
        if seg.memsz and seg.gpa < HIGH_MEMORY and LOW_MEMORY_END < seg.gpa + seg.memsz:
            raise MultibootError(f"{seg.name} {span(seg.gpa, seg.memsz)} covers part of "
                                 f"0x{LOW_MEMORY_END:x}-0x{HIGH_MEMORY - 1:x} (the EBDA, VGA "
                                 "memory and the BIOS), which the memory map reports reserved")


def load_multiboot(memory: GuestMemory, image: bytes | str | os.PathLike, cmdline: str = "",
                   modules: Sequence[tuple[str, bytes]] = (), ram_size: int | None = None
                   ) -> MultibootBoot:
    """Load a Multiboot kernel, its modules and the information structure.

    `modules` are (name, bytes) pairs; each name becomes the module's string. `ram_size`
    is where the RAM above 1 MiB ends (default: the end of the RAM region at 1 MiB).
    """
    data = read_image(image)
    header = parse_header(data)
    kernel, segments = _kernel(data, header)
    _check_reserved(segments)
    ram_end = _ram_end(memory, ram_size)
    mem_lower, mem_upper = LOW_MEMORY_END // 1024, (ram_end - HIGH_MEMORY) // 1024
    mmap = memory_map(ram_end)
    info_flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOT_LOADER_NAME
    modules = [(name, bytes(blob)) for name, blob in modules]

    # The block's size does not depend on where it goes: measure it, place it, then the
    # modules on page boundaries after the kernel (and the block, if it follows the kernel).
    size = len(_information(0, info_flags, mem_lower, mem_upper, mmap,
                            [(name, 0, 0) for name, _ in modules], cmdline))
    info_address = _info_address(segments, size)
    cursor = max(s.gpa + s.memsz for s in segments)
    if info_address != INFO_ADDRESS:
        cursor = info_address + size
    placed = []
    for name, blob in modules:
        start = _following(cursor, len(blob))
        segments.append(ImageSegment(f"module {name!r}", start, blob, len(blob)))
        placed.append((name, start, start + len(blob)))
        cursor = start + len(blob)
    block = _information(info_address, info_flags, mem_lower, mem_upper, mmap, placed, cmdline)
    segments.append(ImageSegment("multiboot information", info_address, block, len(block)))
    for seg in segments:
        if seg.gpa + seg.memsz > min(ram_end, 1 << 32):
            raise MultibootError(f"{seg.name} {span(seg.gpa, seg.memsz)} ends beyond the RAM a "
                                 f"32-bit kernel is told about (up to 0x{min(ram_end, 1 << 32):x})")

    try:
        place(memory, segments)
    except LoadError as e:
        raise MultibootError(str(e)) from e
    return MultibootBoot(entry=kernel.entry, eax=BOOTLOADER_MAGIC, ebx=info_address,
                         header=header, kernel=kernel, modules=placed, cmdline=cmdline,
                         mem_lower=mem_lower, mem_upper=mem_upper, mmap=mmap,
                         info_flags=info_flags)
