"""Boot Linux as QEMU's `-kernel K -initrd I -append A` and kvmtool's `lkvm run -k` do.

Two ways in, both entered in 32-bit protected mode with paging off:

- a **bzImage** (the boot/vmlinuz-* of a distribution kernel), through the 32-bit boot
  protocol (Documentation/arch/x86/boot.rst): its setup header is read and checked
  (`vlab.machine.bootparams`), the protected-mode kernel goes to 1 MiB, the header is
  filled (where the command line and the initrd are) and copied with the e820 memory map
  into the *zero page*; the kernel is entered at `code32_start` with ESI = the zero page.
  QEMU's `x86_load_linux` (hw/i386/x86.c) and kvmtool's `load_bzimage` (x86/kvm.c) read
  and fill the same header, but enter the 16-bit setup code through real mode (QEMU by its
  linuxboot option ROM); the 32-bit entry skips the setup code, as boot.rst allows.
- an ELF **vmlinux** with a XEN_ELFNOTE_PHYS32_ENTRY note: the PVH entry (Xen's
  docs/misc/pvh.pandoc), which QEMU's `x86_load_linux` takes for an ELF kernel
  (`pvh_load_elfboot`): the ELF segments at their physical addresses, an `hvm_start_info`
  with the memory map, command line and the initrd as the first module; EBX = its address.

Guest-physical layout (the tables of `cpu_modes.BootLayout` below 32 KiB, QEMU's address
for the command line, the kernel where the protocols put it):

    0x00500  GDT: null, null, __BOOT_CS 0x10, __BOOT_DS 0x18, TSS 0x20
    0x00600  TSS
    0x07000  the zero page (bzImage) or hvm_start_info, its memory map and module list (PVH)
    0x20000  the command line (QEMU's cmdline_addr)
    0x100000 the protected-mode kernel (bzImage); a vmlinux's segments at their p_paddr
    top      the initrd: page-aligned, as high as fits below min(initrd_addr_max, RAM end)

Everything is checked before a byte is written: a kernel or initrd that does not fit the
RAM, or that overlaps another piece, is refused naming both.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field

from ..kvm.state import DTable, Regs, Sregs
from ..x86 import CR0_ET, CR0_PE, PAGE_SIZE
from .bootparams import (E820_TYPES, SetupHeader, build_zero_page, fill_header,
                         parse_setup_header, version_text)
from .cpu_modes import DEFAULT_LAYOUT, TSS_SIZE, encode_descriptor, gdt_segments
from .loaders import ImageSegment, LoadError, parse_elf, place, read_image
from .memory import GuestMemory, span
from .multiboot import HIGH_MEMORY, memory_map

DEFAULT_MEMORY = "256M"     # what `vlab run --linux` gives: a distribution kernel and a
# busybox initramfs boot in less, but not in the 128 MiB QEMU defaults to with its firmware
BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20   # the selectors boot.rst's 32-bit entry names
GDT_SIZE = 0x30
BOOT_INFO = 0x7000          # the zero page or hvm_start_info (Firecracker's ZERO_PAGE_START)
CMDLINE = 0x20000           # QEMU's cmdline_addr (real_addr 0x10000 + 0x10000)
KERNEL_LOAD = HIGH_MEMORY   # a bzImage's protected-mode kernel: 1 MiB, code32_start's default
# heap_end_ptr as QEMU writes it: the setup code's heap ends where the command line starts,
# counted from the real-mode code (QEMU's at 0x10000), minus 0x200. The 32-bit entry never
# runs the setup code; the field is filled as boot.rst asks of every loader.
REAL_MODE_BASE = 0x10000
HEAP_END_PTR = CMDLINE - REAL_MODE_BASE - 0x200

# PVH (xen/include/public/arch-x86/hvm/start_info.h, xen/include/public/elfnote.h)
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")   # magic, version, flags, nr_modules,
# modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")       # addr, size, type, reserved
ELF_MAGIC = b"\x7fELF"


class LinuxBootError(LoadError):
    """A kernel, initrd or command line that cannot be booted on this VM, and why."""


@dataclass
class LinuxBoot:
    """What the loader put where, and the state the kernel is entered with."""
    protocol: str                # "bzImage, 32-bit boot protocol 2.15", "PVH (...)"
    entry: int                   # RIP
    boot_info: int               # the zero page (ESI) or hvm_start_info (EBX)
    cmdline: str
    e820: list[tuple[int, int, int]]
    kernel: list[tuple[int, int]]            # (gpa, size) of what was copied
    runtime: tuple[int, int] | None = None   # bzImage: where it decompresses, init_size
    initrd: tuple[int, int] | None = None    # (gpa, size)
    header: SetupHeader | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def regs(self) -> Regs:
        """The general registers at entry: boot.rst's 32-bit protocol has ESI = the zero
        page and EBP, EDI, EBX zero; PVH has EBX = hvm_start_info. IF off (RFLAGS 0x2)."""
        pvh = self.header is None
        return Regs(rip=self.entry, rflags=0x2, rbx=self.boot_info if pvh else 0,
                    rsi=0 if pvh else self.boot_info)

    def summary(self) -> str:
        lines = [f"Linux, {self.protocol}: entry {self.entry:#x}"]
        if self.header is not None:
            lines += self.header.describe().splitlines()
        lines += [f"  kernel  {span(gpa, size)}" for gpa, size in self.kernel]
        if self.runtime:
            start, size = self.runtime
            lines.append(f"  runs at {span(start, size)} (init_size {size:#x}: where it "
                         f"decompresses itself)")
        if self.initrd:
            lines.append(f"  initrd  {span(*self.initrd)}  {self.initrd[1]} bytes")
        what = "zero page" if self.header is not None else "hvm_start_info"
        lines.append(f"  {what} at {self.boot_info:#x}, command line at {CMDLINE:#x}: "
                     f"{self.cmdline!r}")
        lines += [f"  e820    {span(base, size)}  {E820_TYPES.get(kind, kind)}"
                  for base, size, kind in self.e820]
        register = "ebx" if self.header is None else "esi"
        lines.append(f"  enter in 32-bit protected mode, paging off, IF=0: cs={BOOT_CS:#x} "
                     f"ds=es=ss={BOOT_DS:#x} (flat 4 GiB), {register}={self.boot_info:#x}, "
                     f"eip={self.entry:#x}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _cmdline(text: str, limit: int | None) -> bytes:
    if "\0" in text:
        raise LinuxBootError(f"the command line {text!r} contains a NUL byte, which would "
                             "end it early")
    data = text.encode()
    if limit is not None and len(data) > limit:
        raise LinuxBootError(f"the command line is {len(data)} bytes; the kernel's "
                             f"cmdline_size allows {limit}")
    return data + b"\0"


def _initrd_at(size: int, highest: int, ram_end: int, floor: int, what: str) -> int:
    """QEMU's placement: page-aligned, ending as high as fits at or below `highest` (the
    initrd's last byte may be there) and the RAM's end; refused if that is below `floor`."""
    top = min(highest + 1, ram_end)
    start = (top - size) & ~(PAGE_SIZE - 1)
    if size > top or start < floor:
        raise LinuxBootError(f"the initrd ({size} bytes) does not fit between {what} "
                             f"(up to {floor:#x}) and {top:#x} (min(initrd_addr_max + 1, RAM "
                             f"end)): give the VM more memory")
    return start


def pvh_entry(data: bytes) -> int | None:
    """The physical entry address from a vmlinux's XEN_ELFNOTE_PHYS32_ENTRY note (name
    "Xen", type 18; 4 or 8 bytes), read from its PT_NOTE segments; None without one."""
    from elftools.common.exceptions import ELFError   # as in loaders.parse_elf: only
    from elftools.elf.elffile import ELFFile          # when an ELF kernel is booted
    try:
        found = [segment.data() for segment in ELFFile(io.BytesIO(data)).iter_segments()
                 if segment.header.p_type == "PT_NOTE"]
    except ELFError as e:
        raise LinuxBootError(f"malformed ELF kernel: {e}") from e
    for notes in found:
        offset = 0
        while offset + 12 <= len(notes):
            namesz, descsz, kind = struct.unpack_from("<III", notes, offset)
            name_at = offset + 12
            desc_at = name_at + (-(-namesz // 4) * 4)
            name = notes[name_at:name_at + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
                return int.from_bytes(notes[desc_at:desc_at + descsz], "little")
            offset = desc_at + (-(-descsz // 4) * 4)
    return None


def _bzimage(data: bytes, cmdline: str, initrd: bytes | None, ram_end: int,
             acpi_rsdp: int) -> tuple[LinuxBoot, list[ImageSegment]]:
    header = parse_setup_header(data)
    kernel = data[header.setup_size:header.setup_size + header.kernel_size]
    start = header.runtime_start(KERNEL_LOAD)
    needed = header.memory_needed
    if start + needed > ram_end:
        raise LinuxBootError(f"the kernel needs {needed:#x} bytes (init_size) from "
                             f"{start:#x}, where it runs, up to {start + needed:#x}; this "
                             f"VM's RAM ends at {ram_end:#x}: give it more memory")
    command = _cmdline(cmdline, header.fields["cmdline_size"])
    segments = [ImageSegment("the protected-mode kernel", KERNEL_LOAD, kernel, len(kernel)),
                ImageSegment("the command line", CMDLINE, command, len(command))]
    image, size = 0, 0
    floor = max(KERNEL_LOAD + len(kernel), start + needed)
    if initrd:
        size = len(initrd)
        image = _initrd_at(size, header.initrd_max, ram_end, floor,
                           "the kernel's decompression area")
        segments.append(ImageSegment("the initrd", image, initrd, size))
    e820 = memory_map(ram_end)
    filled = fill_header(header, cmd_line_ptr=CMDLINE, ramdisk_image=image,
                         ramdisk_size=size, code32_start=KERNEL_LOAD,
                         heap_end_ptr=HEAP_END_PTR)
    segments.append(ImageSegment("the zero page", BOOT_INFO,
                                 build_zero_page(filled, e820, acpi_rsdp), PAGE_SIZE))
    boot = LinuxBoot(f"bzImage, 32-bit boot protocol {version_text(header.version)}",
                     entry=KERNEL_LOAD, boot_info=BOOT_INFO, cmdline=cmdline, e820=e820,
                     kernel=[(KERNEL_LOAD, len(kernel))], runtime=(start, needed),
                     initrd=(image, size) if initrd else None, header=header)
    return boot, segments


def _pvh(data: bytes, cmdline: str, initrd: bytes | None, ram_end: int,
         acpi_rsdp: int) -> tuple[LinuxBoot, list[ImageSegment]]:
    elf = parse_elf(data)
    entry = pvh_entry(data)
    if entry is None:
        raise LinuxBootError("this ELF kernel has no XEN_ELFNOTE_PHYS32_ENTRY note (name "
                             "\"Xen\", type 18), so it has no PVH entry: boot its bzImage "
                             "instead, or build it with CONFIG_PVH")
    segments = list(elf.segments)
    kernel_end = max(s.gpa + s.memsz for s in segments)
    if kernel_end > ram_end:
        raise LinuxBootError(f"the kernel's segments reach {kernel_end:#x}; this VM's RAM "
                             f"ends at {ram_end:#x}: give it more memory")
    e820 = memory_map(ram_end)
    command = _cmdline(cmdline, None)
    segments.append(ImageSegment("the command line", CMDLINE, command, len(command)))
    memmap_at = BOOT_INFO + HVM_START_INFO.size
    modlist_at = memmap_at + HVM_MEMMAP_ENTRY.size * len(e820)
    modules = b""
    initrd_span = None
    if initrd:
        image = _initrd_at(len(initrd), 0xFFFFFFFF, ram_end, kernel_end, "the kernel")
        segments.append(ImageSegment("the initrd", image, initrd, len(initrd)))
        modules = HVM_MODLIST_ENTRY.pack(image, len(initrd), 0, 0)
        initrd_span = (image, len(initrd))
    info = HVM_START_INFO.pack(HVM_START_MAGIC, 1, 0, 1 if initrd else 0,
                               modlist_at if initrd else 0, CMDLINE, acpi_rsdp, memmap_at,
                               len(e820), 0)
    table = b"".join(HVM_MEMMAP_ENTRY.pack(base, size, kind, 0) for base, size, kind in e820)
    block = info + table + modules
    segments.append(ImageSegment("hvm_start_info", BOOT_INFO, block, len(block)))
    boot = LinuxBoot("PVH (XEN_ELFNOTE_PHYS32_ENTRY)", entry=entry, boot_info=BOOT_INFO,
                     cmdline=cmdline, e820=e820,
                     kernel=[(s.gpa, s.memsz) for s in elf.segments], initrd=initrd_span)
    return boot, segments


def plan_linux(kernel: bytes | str | os.PathLike, initrd: bytes | str | os.PathLike | None,
               cmdline: str, ram_end: int, acpi_rsdp: int = 0
               ) -> tuple[LinuxBoot, list[ImageSegment]]:
    """Check a bzImage or a PVH vmlinux, its initrd and command line against RAM that ends
    at `ram_end`, and decide where each piece goes, writing nothing: what was decided and
    the bytes to place."""
    data = read_image(kernel)
    blob = read_image(initrd) if initrd is not None else None
    load = _pvh if data[:4] == ELF_MAGIC else _bzimage
    return load(data, cmdline, blob, min(ram_end, 1 << 32), acpi_rsdp)


def load_linux_image(memory: GuestMemory, kernel: bytes | str | os.PathLike,
                     initrd: bytes | str | os.PathLike | None = None, cmdline: str = "",
                     ram_size: int | None = None, acpi_rsdp: int = 0) -> LinuxBoot:
    """`plan_linux`, then the pieces into guest memory (`ram_size`: where the RAM the
    kernel is told of ends, default the end of the RAM at 1 MiB). `acpi_rsdp`: the ACPI
    RSDP's address, 0 for none. Nothing is written unless everything fits."""
    region = memory.find(HIGH_MEMORY)
    if region is None or region.kind != "ram":
        raise LinuxBootError("no RAM at 1 MiB (0x100000), where Linux is loaded")
    ram_end = region.end if ram_size is None else min(ram_size, region.end)
    boot, segments = plan_linux(kernel, initrd, cmdline, ram_end, acpi_rsdp)
    try:
        place(memory, segments)
    except LoadError as e:
        raise LinuxBootError(str(e)) from e
    return boot


def boot_gdt() -> bytes:
    """The GDT of the 32-bit entry: boot.rst asks for flat 4 GiB __BOOT_CS (0x10,
    execute/read) and __BOOT_DS (0x18, read/write); the TSS at 0x20 gives TR a usable
    descriptor, which VM entry demands (PVH asks for a 32-bit TSS too)."""
    segs = gdt_segments()
    return (bytes(16) + encode_descriptor(segs["code32"]) + encode_descriptor(segs["data"])
            + encode_descriptor(segs["tss"]) + bytes(8))


def entry_sregs(sregs: Sregs) -> Sregs:
    """The special registers at entry: protected mode (CR0 = PE|ET), paging and every
    extension off, the flat segments from `boot_gdt`, no IDT."""
    segs = gdt_segments()
    code = segs["code32"].replace(selector=BOOT_CS)
    data = segs["data"].replace(selector=BOOT_DS)
    tss = segs["tss"].replace(selector=BOOT_TSS)
    return sregs.replace(cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tss,
                         gdt=DTable(base=DEFAULT_LAYOUT.gdt, limit=GDT_SIZE - 1),
                         idt=DTable(base=0, limit=0), cr0=CR0_PE | CR0_ET, cr3=0, cr4=0,
                         efer=0)


def enter_linux(vcpu, memory: GuestMemory, boot: LinuxBoot) -> list[tuple[int, int, str]]:
    """Write the GDT and TSS, and put `vcpu` at the kernel's entry (KVM_SET_SREGS,
    KVM_SET_REGS); returns what was written where, as (gpa, length, what)."""
    memory.write(DEFAULT_LAYOUT.gdt, boot_gdt())
    memory.write(DEFAULT_LAYOUT.tss, bytes(TSS_SIZE))
    vcpu.set_sregs(entry_sregs(vcpu.get_sregs()))
    vcpu.set_regs(boot.regs)
    return [(DEFAULT_LAYOUT.gdt, GDT_SIZE, f"GDT: __BOOT_CS {BOOT_CS:#x}, __BOOT_DS "
             f"{BOOT_DS:#x}, TSS {BOOT_TSS:#x}"), (DEFAULT_LAYOUT.tss, TSS_SIZE, "TSS (zeroed)")]


def load_linux(machine, kernel: bytes | str | os.PathLike,
               initrd: bytes | str | os.PathLike | None = None, append: str = "",
               acpi_rsdp: int = 0) -> LinuxBoot:
    """Load Linux into `machine` (a vlab.machine.board.Machine) and put its first vCPU at
    the entry; the others, if any, wait for the kernel's INIT/SIPI."""
    boot = load_linux_image(machine.memory, kernel, initrd, append,
                            ram_size=machine.ram_size, acpi_rsdp=acpi_rsdp)
    enter_linux(machine.runners[0].vcpu, machine.memory, boot)
    return boot


def boot_linux(kernel: bytes | str | os.PathLike, initrd: bytes | str | os.PathLike | None = None,
               *, append: str = "", memory: int | str = DEFAULT_MEMORY,
               **options) -> "PcResult":  # noqa: F821 (vlab.machine.pc.PcResult)
    """Build the PC Linux needs (`vlab.machine.pc.create_linux_pc`, unless `create` says
    otherwise), load Linux (`load_linux`) and run it until it stops, with
    `vlab.machine.pc.boot_pc`'s `options` (smp, accel, timeout, output, cpu_model, reboot,
    kernel_trace, create)."""
    from .board import check_ram_size
    from .pc import boot_pc, create_linux_pc
    options.setdefault("create", create_linux_pc)
    kernel = read_image(kernel)
    initrd = read_image(initrd) if initrd is not None else None
    plan_linux(kernel, initrd, append, check_ram_size(memory))   # refused before a VM exists
    return boot_pc(lambda machine: load_linux(machine, kernel, initrd, append),
                   memory=memory, **options)


__all__ = ["LinuxBoot", "LinuxBootError", "load_linux_image", "load_linux", "enter_linux",
           "boot_linux", "plan_linux", "pvh_entry", "entry_sregs", "boot_gdt", "DEFAULT_MEMORY"]
