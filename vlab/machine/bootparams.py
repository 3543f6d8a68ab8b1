"""The x86 Linux boot protocol's structures: the bzImage setup header and the zero page.

A bzImage (Documentation/arch/x86/boot.rst) is a 512-byte boot sector, `setup_sects`
sectors of real-mode setup code, then the protected-mode kernel (`syssize` 16-byte
paragraphs). The *setup header* starts at offset 0x1f1 of the file: fields the kernel
fills at build time (what it is, what it needs) and fields the boot loader fills (where
it put the command line and the initrd). The boot loader copies the header into the
*zero page*, `struct boot_params` (Documentation/arch/x86/zero-page.rst), a 4 KiB page
that also holds the e820 memory map, and hands the kernel that page's address.

This module reads and checks the header and builds the zero page; `vlab.machine.linux`
places everything in guest memory. Every check names the field it read, so a malformed or
truncated image is refused with the reason, before any byte reaches guest memory.

The oldest boot protocol accepted is 2.06 (Linux 2.6.22, 2007): from 2.06 on the header
has every field the 32-bit entry needs to be filled safely (cmd_line_ptr since 2.02,
initrd_addr_max since 2.03, kernel_alignment and relocatable_kernel since 2.05, and
cmdline_size, without which the command line's limit is a guess, since 2.06).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .loaders import LoadError

SETUP_HEADER = 0x1F1       # the header's offset, in the file and in the zero page
SECTOR = 512
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x206
DEFAULT_SETUP_SECTS = 4    # "if setup_sects is 0, the real value is 4"
ZERO_PAGE_SIZE = 0x1000

# loadflags (boot.rst "Details of header fields")
LOADED_HIGH = 1 << 0       # the protected-mode code goes at 0x100000 (a bzImage)
KASLR_FLAG = 1 << 1        # set by the kernel's decompressor, for the kernel
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6     # obsolete; a loader must leave it clear
CAN_USE_HEAP = 1 << 7      # heap_end_ptr is valid
LOADFLAGS = {LOADED_HIGH: "LOADED_HIGH", KASLR_FLAG: "KASLR_FLAG", QUIET_FLAG: "QUIET_FLAG",
             KEEP_SEGMENTS: "KEEP_SEGMENTS", CAN_USE_HEAP: "CAN_USE_HEAP"}
# xloadflags (protocol 2.12)
XLOADFLAGS = {1 << 0: "XLF_KERNEL_64", 1 << 1: "XLF_CAN_BE_LOADED_ABOVE_4G",
              1 << 2: "XLF_EFI_HANDOVER_32", 1 << 3: "XLF_EFI_HANDOVER_64",
              1 << 4: "XLF_EFI_KEXEC", 1 << 5: "XLF_5LEVEL", 1 << 6: "XLF_5LEVEL_ENABLED"}
TYPE_OF_LOADER_UNDEFINED = 0xFF   # "a boot loader without an assigned id"
NORMAL_VGA = 0xFFFF               # vid_mode "normal": vga=normal, the 80x25 text mode
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF   # boot.rst, for protocols before 2.03

# The setup header, field by field: name -> (offset in file and zero page, struct format,
# first protocol version that has it). boot.rst's table, in its order.
FIELDS = {
    "setup_sects": (0x1F1, "B", 0), "root_flags": (0x1F2, "H", 0), "syssize": (0x1F4, "I", 0),
    "ram_size": (0x1F8, "H", 0), "vid_mode": (0x1FA, "H", 0), "root_dev": (0x1FC, "H", 0),
    "boot_flag": (0x1FE, "H", 0), "jump": (0x200, "H", 0x200), "header": (0x202, "4s", 0x200),
    "version": (0x206, "H", 0x200), "realmode_swtch": (0x208, "I", 0x200),
    "start_sys_seg": (0x20C, "H", 0x200), "kernel_version": (0x20E, "H", 0x200),
    "type_of_loader": (0x210, "B", 0x200), "loadflags": (0x211, "B", 0x200),
    "setup_move_size": (0x212, "H", 0x202), "code32_start": (0x214, "I", 0x200),
    "ramdisk_image": (0x218, "I", 0x200), "ramdisk_size": (0x21C, "I", 0x200),
    "bootsect_kludge": (0x220, "I", 0x200), "heap_end_ptr": (0x224, "H", 0x201),
    "ext_loader_ver": (0x226, "B", 0x202), "ext_loader_type": (0x227, "B", 0x202),
    "cmd_line_ptr": (0x228, "I", 0x202), "initrd_addr_max": (0x22C, "I", 0x203),
    "kernel_alignment": (0x230, "I", 0x205), "relocatable_kernel": (0x234, "B", 0x205),
    "min_alignment": (0x235, "B", 0x210), "xloadflags": (0x236, "H", 0x20C),
    "cmdline_size": (0x238, "I", 0x206), "hardware_subarch": (0x23C, "I", 0x207),
    "hardware_subarch_data": (0x240, "Q", 0x207), "payload_offset": (0x248, "I", 0x208),
    "payload_length": (0x24C, "I", 0x208), "setup_data": (0x250, "Q", 0x209),
    "pref_address": (0x258, "Q", 0x20A), "init_size": (0x260, "I", 0x20A),
    "handover_offset": (0x264, "I", 0x20B), "kernel_info_offset": (0x268, "I", 0x20F),
}

# struct boot_params (zero-page.rst): the offsets a loader fills besides the header.
ACPI_RSDP_ADDR = 0x070     # u64
E820_ENTRIES = 0x1E8       # u8
SENTINEL = 0x1EF           # u8: nonzero means "this loader did not zero the page"
E820_TABLE = 0x2D0         # struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE]
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")   # addr, size, type: 20 bytes, packed
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS, E820_UNUSABLE = 1, 2, 3, 4, 5
E820_TYPES = {E820_RAM: "usable", E820_RESERVED: "reserved", E820_ACPI: "ACPI data",
              E820_NVS: "ACPI NVS", E820_UNUSABLE: "unusable"}


class BzImageError(LoadError):
    """An image that is not a bzImage this loader can boot, or is cut short."""


def _names(value: int, table: dict[int, str]) -> str:
    return "|".join(name for bit, name in table.items() if value & bit) or "0"


def version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


@dataclass(frozen=True)
class SetupHeader:
    """A bzImage's setup header, read and checked (`parse_setup_header`).

    `fields` holds every field the image's protocol version has, by boot.rst's name; the
    properties are the values a loader works with (defaults applied where the protocol
    says so). `raw` is the header's bytes from 0x1f1 to its end, which the zero page gets.
    """
    fields: dict[str, int | bytes]
    raw: bytes
    file_size: int

    def __getattr__(self, name: str):
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode kernel: the boot sector and the setup sectors."""
        return (self.fields["setup_sects"] or DEFAULT_SETUP_SECTS) * SECTOR + SECTOR

    @property
    def kernel_size(self) -> int:
        """The protected-mode kernel's bytes in the file (syssize is in 16-byte paragraphs)."""
        return self.fields["syssize"] * 16

    @property
    def relocatable(self) -> bool:
        return bool(self.fields.get("relocatable_kernel"))

    @property
    def alignment(self) -> int:
        return self.fields.get("kernel_alignment") or 0x1000

    @property
    def initrd_max(self) -> int:
        """The highest address the initrd may occupy (its last byte)."""
        return self.fields.get("initrd_addr_max", DEFAULT_INITRD_ADDR_MAX)

    @property
    def preferred(self) -> int:
        """Where the kernel runs when not relocated (pref_address, since 2.10)."""
        return self.fields.get("pref_address") or 0x100000

    def runtime_start(self, load_address: int) -> int:
        """Where the kernel decompresses itself and runs: a relocatable kernel at its load
        address rounded up to kernel_alignment but not below its preferred address (what
        arch/x86/boot/compressed/head_64.S computes), else at pref_address."""
        if not self.relocatable:
            return self.preferred
        aligned = -(-load_address // self.alignment) * self.alignment
        return max(aligned, self.preferred)

    @property
    def memory_needed(self) -> int:
        """init_size (since 2.10): bytes from the runtime start the kernel needs before it
        reads its memory map; older kernels say nothing, so the file's size is the floor."""
        return self.fields.get("init_size") or self.kernel_size

    def describe(self) -> str:
        f = self.fields
        lines = [f"bzImage, boot protocol {version_text(f['version'])}: setup_sects "
                 f"{f['setup_sects']} ({self.setup_size} bytes of boot sector and setup), "
                 f"syssize {f['syssize']:#x} ({self.kernel_size} bytes of protected-mode kernel)",
                 f"  loadflags {f['loadflags']:#04x} ({_names(f['loadflags'], LOADFLAGS)}), "
                 f"code32_start {f['code32_start']:#x}"]
        if "kernel_alignment" in f:
            lines.append(f"  relocatable_kernel {f['relocatable_kernel']}, kernel_alignment "
                         f"{f['kernel_alignment']:#x}"
                         + (f", pref_address {f['pref_address']:#x}, init_size "
                            f"{f['init_size']:#x}" if "init_size" in f else ""))
        lines.append(f"  cmdline_size {f['cmdline_size']}, initrd_addr_max "
                     f"{self.initrd_max:#x}"
                     + (f", xloadflags {f['xloadflags']:#x} "
                        f"({_names(f['xloadflags'], XLOADFLAGS)})" if "xloadflags" in f else ""))
        return "\n".join(lines)


def _read(data: bytes, name: str) -> int | bytes:
    offset, fmt, _ = FIELDS[name]
    return struct.unpack_from("<" + fmt, data, offset)[0]


def parse_setup_header(data: bytes) -> SetupHeader:
    """Read the setup header of a bzImage and check what a loader relies on: boot_flag,
    the "HdrS" magic, the protocol version, LOADED_HIGH, and that setup_sects and syssize
    describe bytes the file really has."""
    size = len(data)
    if size < SECTOR:
        raise BzImageError(f"not a bzImage: a bzImage starts with a {SECTOR}-byte boot sector "
                           f"holding boot_flag at 0x1fe; the file has {size} bytes")
    boot_flag = _read(data, "boot_flag")
    if boot_flag != BOOT_FLAG:
        raise BzImageError(f"not a bzImage: boot_flag (offset 0x1fe) is {boot_flag:#06x}, "
                           f"must be {BOOT_FLAG:#06x}")
    if size < 0x208:
        raise BzImageError(f"truncated bzImage: the setup header's magic and version end at "
                           f"0x208, the file has {size} bytes")
    magic = _read(data, "header")
    if magic != HEADER_MAGIC:
        raise BzImageError(f"not a bzImage: the setup header's magic (offset 0x202) is "
                           f"{magic!r}, must be {HEADER_MAGIC!r} (a kernel older than boot "
                           f"protocol 2.00, or no kernel at all)")
    version = _read(data, "version")
    if version < MIN_PROTOCOL:
        raise BzImageError(f"boot protocol {version_text(version)} (version {version:#06x}) "
                           f"is older than {version_text(MIN_PROTOCOL)}, the oldest this "
                           f"loader fills (cmdline_size arrived in 2.06)")
    end = 0x202 + data[0x201]   # the jump at 0x200 skips the header: its end
    if size < end:
        raise BzImageError(f"truncated bzImage: the setup header runs to {end:#x} (the jump "
                           f"at 0x200 says so), the file has {size} bytes")
    fields = {name: _read(data, name) for name, (offset, fmt, since) in FIELDS.items()
              if version >= since and offset + struct.calcsize(fmt) <= end}
    header = SetupHeader(fields, data[SETUP_HEADER:end], size)
    sects = fields["setup_sects"] or DEFAULT_SETUP_SECTS
    if header.setup_size > size:
        raise BzImageError(f"truncated bzImage: setup_sects says {sects} sectors but the file "
                           f"has {max(size - SECTOR, 0) // SECTOR} after the boot sector "
                           f"({size} bytes)")
    if not fields["loadflags"] & LOADED_HIGH:
        raise BzImageError("loadflags bit 0 (LOADED_HIGH) is clear: a zImage, whose kernel "
                           "loads at 0x10000; this loader boots bzImages only")
    if not fields["syssize"]:
        raise BzImageError("syssize is 0: the image has no protected-mode kernel")
    if header.setup_size + header.kernel_size > size:
        raise BzImageError(f"truncated bzImage: syssize says {header.kernel_size} bytes of "
                           f"protected-mode kernel ({fields['syssize']:#x} paragraphs) after "
                           f"the {header.setup_size} bytes of setup, but the file has "
                           f"{size - header.setup_size}")
    alignment = fields.get("kernel_alignment", 0)
    if header.relocatable and (alignment <= 0 or alignment & (alignment - 1)):
        raise BzImageError(f"kernel_alignment {alignment:#x} of a relocatable kernel is not "
                           f"a power of two")
    return header


def fill_header(header: SetupHeader, *, cmd_line_ptr: int, ramdisk_image: int,
                ramdisk_size: int, code32_start: int, heap_end_ptr: int) -> bytes:
    """The header bytes with the loader's fields written (boot.rst "The real-mode kernel
    header", what QEMU's x86_load_linux writes): type_of_loader, loadflags with
    CAN_USE_HEAP, heap_end_ptr, cmd_line_ptr, the initrd, code32_start, vid_mode."""
    raw = bytearray(header.raw)

    def put(name: str, value: int) -> None:
        offset, fmt, _ = FIELDS[name]
        struct.pack_into("<" + fmt, raw, offset - SETUP_HEADER, value)

    put("type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    put("loadflags", (header.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS)
    put("heap_end_ptr", heap_end_ptr)
    put("vid_mode", NORMAL_VGA)
    put("cmd_line_ptr", cmd_line_ptr)
    put("ramdisk_image", ramdisk_image)
    put("ramdisk_size", ramdisk_size)
    put("code32_start", code32_start)
    return bytes(raw)


def build_zero_page(header_bytes: bytes, e820: list[tuple[int, int, int]],
                    acpi_rsdp: int = 0) -> bytes:
    """struct boot_params: zeros (sentinel 0: every field below is the loader's), the filled
    setup header at 0x1f1, the e820 table at 0x2d0 with its count at 0x1e8, and the ACPI
    RSDP's address at 0x70 when there is one."""
    if len(e820) > E820_MAX_ENTRIES:
        raise BzImageError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER:SETUP_HEADER + len(header_bytes)] = header_bytes
    page[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(page, E820_TABLE + i * E820_ENTRY.size, *entry)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, acpi_rsdp)
    return bytes(page)


def read_e820(page: bytes) -> list[tuple[int, int, int]]:
    """The e820 table a zero page holds (what the kernel's setup_memory_map reads)."""
    return [E820_ENTRY.unpack_from(page, E820_TABLE + i * E820_ENTRY.size)
            for i in range(page[E820_ENTRIES])]
