"""Small Linux-shaped images for the loader's tests: a bzImage built field by field around
any protected-mode code, and an ELF64 vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note."""
from __future__ import annotations

import struct

from vlab.machine.bootparams import FIELDS, LOADED_HIGH, SECTOR

HEADER_END = 0x26C   # protocol 2.15's header ends after kernel_info_offset


def make_bzimage(kernel: bytes = b"\xf4" * 64, *, setup_sects: int = 4, version: int = 0x20F,
                 loadflags: int = LOADED_HIGH, relocatable: int = 1,
                 kernel_alignment: int = 0x200000, pref_address: int = 0x100000,
                 init_size: int = 0x100000, cmdline_size: int = 255,
                 initrd_addr_max: int = 0x7FFFFFFF, xloadflags: int = 0x3,
                 boot_flag: int = 0xAA55, magic: bytes = b"HdrS", syssize: int | None = None,
                 **extra: int) -> bytes:
    """A bzImage: boot sector with the setup header, `setup_sects` setup sectors (filled
    with 0xcc, never run by the 32-bit entry), then `kernel` padded to 16 bytes."""
    kernel = kernel + b"\0" * (-len(kernel) % 16)
    image = bytearray((setup_sects or 4) * SECTOR + SECTOR)
    image[SECTOR:] = b"\xcc" * (len(image) - SECTOR)
    values = dict(setup_sects=setup_sects, boot_flag=boot_flag, header=magic, version=version,
                  loadflags=loadflags, relocatable_kernel=relocatable,
                  kernel_alignment=kernel_alignment, pref_address=pref_address,
                  init_size=init_size, cmdline_size=cmdline_size,
                  initrd_addr_max=initrd_addr_max, xloadflags=xloadflags,
                  syssize=len(kernel) // 16 if syssize is None else syssize,
                  code32_start=0x100000, vid_mode=0xFFFD, root_dev=0x0301, **extra)
    image[0x200:0x202] = bytes([0xEB, HEADER_END - 0x202])   # jmp over the header
    for name, value in values.items():
        offset, fmt, _ = FIELDS[name]
        struct.pack_into("<" + fmt, image, offset, value)
    return bytes(image) + kernel


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)   # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def make_pvh_elf(code: bytes, load: int = 0x100000, entry: int | None = None,
                 note: bool = True) -> bytes:
    """An ELF64 executable: one PT_LOAD of `code` at physical `load` (virtual addresses
    high, as vmlinux's), a PT_NOTE with a GNU note and, with `note`, the Xen PHYS32_ENTRY
    note giving `entry` (default `load`) as 8 bytes, as Linux's _ASM_PTR does."""
    notes = _note(b"GNU", 3, b"\x11" * 20)
    if note:
        notes += _note(b"Xen", 18, struct.pack("<Q", load if entry is None else entry))
    ehsize, phentsize, phnum = 64, 56, 2
    notes_at = ehsize + phentsize * phnum
    code_at = (notes_at + len(notes) + 0xFFF) & ~0xFFF
    header = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                         2, 62, 1, 0xFFFFFFFF80000000 + load, ehsize, 0, 0, ehsize,
                         phentsize, phnum, 64, 0, 0)
    load_ph = struct.pack("<IIQQQQQQ", 1, 5, code_at, 0xFFFFFFFF80000000 + load, load,
                          len(code), len(code) + 0x1000, 0x1000)
    note_ph = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    image = bytearray(header + load_ph + note_ph + notes)
    image += bytes(code_at - len(image)) + code
    return bytes(image)
