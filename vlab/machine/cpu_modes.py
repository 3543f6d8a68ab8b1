"""CPU mode setup: the GDT, page tables and special registers a guest starts in.

A fresh vCPU starts like a CPU after RESET: real mode, paging off (Intel SDM Vol. 3A 9.1).
Firmware or a boot loader would climb to protected and long mode by itself; a VMM can
instead write the descriptor tables and page tables into guest memory and hand KVM the
finished `struct kvm_sregs` with `KVM_SET_SREGS`, which is what QEMU's `-kernel` path,
Firecracker (`configure_segments_and_sregs`) and dpw/kvm-hello-world do. This module
does that for four modes and checks special registers the way KVM will before KVM is asked.

Guest-physical layout (`BootLayout`, all below the guest code at 0x8000):

    0x0400-0x04ff  free for guests (the example guests store their result at 0x400)
    0x0500-0x052f  GDT: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18),
                   TSS (0x20, 16 bytes)
    0x0600-0x0667  TSS (zeroed; TR must point at one, SDM Vol. 3A 7.2.4)
    0x1000-0x6fff  page tables: 32-bit page directory, or PML4, PDPT and up to 4 PDs
    0x7000-0x7fff  stack, growing down from 0x8000
    0x8000-        guest code
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from vlab.kvm.state import DTable, Regs, Segment, Sregs
from vlab.x86 import (CR0_BITS, CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, CR4_PSE,
                      EFER_LMA, EFER_LME, SEG_TYPE_CODE_XR, SEG_TYPE_DATA_RW,
                      SEG_TYPE_TSS_BUSY, decode_bits)


class CpuMode(str, Enum):
    REAL = "real"            # 16-bit, CR0.PE = 0
    PROTECTED = "protected"  # 32-bit flat segments, paging off
    PAGED = "paged"          # 32-bit with 4 MiB (PSE) pages, identity mapped
    LONG = "long"            # 64-bit, 4-level paging with 2 MiB pages, identity mapped

    @property
    def bits(self) -> int:
        """The code size of the mode's code segment."""
        return {"real": 16, "protected": 32, "paged": 32, "long": 64}[self.value]


class GuestWriter(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


# --- memory layout

@dataclass(frozen=True)
class BootLayout:
    """Where `setup_mode` puts its tables and where the guest's code and stack go.

    Everything sits in the first 32 KiB, the low memory a PC boot loader also uses, so
    the guest owns all RAM from `code` up.
    """
    gdt: int = 0x500
    tss: int = 0x600
    page_tables: int = 0x1000
    page_tables_end: int = 0x7000
    stack_top: int = 0x8000
    code: int = 0x8000


DEFAULT_LAYOUT = BootLayout()

# GDT selectors, the order Linux's boot GDT also uses for its flat segments.
SEL_CODE32, SEL_DATA, SEL_CODE64, SEL_TSS = 0x08, 0x10, 0x18, 0x20
_GDT_SIZE = 0x30  # five 8-byte slots plus the upper half of the 16-byte TSS descriptor
TSS_SIZE = 0x68   # a 32-bit TSS is 104 bytes (SDM Vol. 3A 7.2.1); a 64-bit one too (7.7)

# Page-table entry flags, named as in Linux's pgtable_types.h (SDM Vol. 3A 4.3, 4.5).
PAGE_PRESENT, PAGE_RW, PAGE_USER, PAGE_PSE = 0x1, 0x2, 0x4, 0x80
# U/S is set too (as kvm-hello-world does), so ring-3 guest code can use the same map.
_TABLE = PAGE_PRESENT | PAGE_RW | PAGE_USER
PAGE_4K, PAGE_2M, PAGE_4M = 1 << 12, 1 << 21, 1 << 22


def encode_descriptor(seg: Segment) -> bytes:
    """The 8-byte GDT entry whose loading gives the descriptor cache `seg` (SDM 3.4.5).

    `kvm_segment.limit` is in bytes; the descriptor holds 20 bits, counted in 4 KiB units
    when G=1, so a flat 4 GiB segment is limit 0xfffff with G=1.
    """
    if seg.g:
        if seg.limit & 0xFFF != 0xFFF or seg.limit >> 12 > 0xFFFFF:
            raise ValueError(f"limit {seg.limit:#x} with G=1 must be 0xnnnnnfff below 4 GiB")
        raw_limit = seg.limit >> 12
    elif seg.limit > 0xFFFFF:
        raise ValueError(f"limit {seg.limit:#x} needs G=1 (more than 20 bits)")
    else:
        raw_limit = seg.limit
    base = seg.base & 0xFFFFFFFF
    access = seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7
    flags = seg.avl | seg.l << 1 | seg.db << 2 | seg.g << 3
    value = (raw_limit & 0xFFFF | (base & 0xFFFFFF) << 16 | access << 40
             | (raw_limit >> 16) << 48 | flags << 52 | (base >> 24) << 56)
    return value.to_bytes(8, "little")


def decode_descriptor(raw: bytes, selector: int = 0) -> Segment:
    """The descriptor cache a CPU fills from an 8-byte GDT entry: `encode_descriptor` reversed."""
    value = int.from_bytes(raw[:8], "little")
    raw_limit = value & 0xFFFF | (value >> 48 & 0xF) << 16
    access, flags = value >> 40 & 0xFF, value >> 52 & 0xF
    g = flags >> 3 & 1
    return Segment(
        base=(value >> 16 & 0xFFFFFF) | (value >> 56) << 24,
        limit=(raw_limit << 12 | 0xFFF) if g else raw_limit,
        selector=selector, type=access & 0xF, s=access >> 4 & 1, dpl=access >> 5 & 3,
        present=access >> 7, avl=flags & 1, l=flags >> 1 & 1, db=flags >> 2 & 1, g=g)


def _flat(selector: int, type_: int, *, l: int = 0) -> Segment:  # noqa: E741
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1,
                   dpl=0, db=0 if l else 1, s=1, l=l, g=1)


def gdt_segments(layout: BootLayout = DEFAULT_LAYOUT) -> dict[str, Segment]:
    """The GDT's descriptors as the caches they load, keyed by role.

    One table serves protected, paged and long mode (both code segments side by side,
    like Linux's boot GDT), so a guest can also far-jump between 32- and 64-bit code.
    """
    return {
        "code32": _flat(SEL_CODE32, SEG_TYPE_CODE_XR),
        "data": _flat(SEL_DATA, SEG_TYPE_DATA_RW),
        "code64": _flat(SEL_CODE64, SEG_TYPE_CODE_XR, l=1),
        "tss": Segment(base=layout.tss, limit=TSS_SIZE - 1, selector=SEL_TSS,
                       type=SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0),
    }


def build_gdt(layout: BootLayout = DEFAULT_LAYOUT) -> bytes:
    """GDT bytes: a null descriptor, then `gdt_segments` at their selectors.

    In long mode a TSS descriptor is 16 bytes, its second half holding base bits 63:32
    (SDM Vol. 3A 7.2.3); in 32-bit modes that half is never loaded.
    """
    segs = gdt_segments(layout)
    table = bytes(8) + b"".join(encode_descriptor(segs[k]) for k in ("code32", "data", "code64"))
    tss = segs["tss"]
    return table + encode_descriptor(tss) + struct.pack("<II", tss.base >> 32, 0)


# --- mode setup

@dataclass(frozen=True)
class ModeSetup:
    """What `setup_mode` produced: the new special registers and the memory it wrote."""
    sregs: Sregs
    writes: list[tuple[int, int, str]] = field(default_factory=list)  # (gpa, length, what)
    description: str = ""


def _ceil_div(size: int, page: int) -> int:
    return -(-size // page)


def _paged32_tables(layout: BootLayout, ram_size: int) -> list[tuple[int, bytes, str]]:
    """One page directory of 4 MiB PSE pages (SDM Vol. 3A 4.3, Table 4-4), identity mapped.

    32-bit paging reaches 4 GiB at most, so at most 1024 entries are filled.
    """
    entries = min(_ceil_div(ram_size, PAGE_4M), 1024)
    pd = b"".join(struct.pack("<I", i * PAGE_4M | _TABLE | PAGE_PSE) for i in range(entries))
    return [(layout.page_tables, pd.ljust(PAGE_4K, b"\0"),
             f"page directory: {entries} x 4 MiB pages")]


def _long_tables(layout: BootLayout, ram_size: int) -> list[tuple[int, bytes, str]]:
    """PML4 -> PDPT -> page directories of 2 MiB pages (SDM Vol. 3A 4.5, Table 4-17).

    One PD covers 1 GiB, so the layout's room for page tables bounds the RAM mapped.
    """
    pages = _ceil_div(ram_size, PAGE_2M)
    n_pd = _ceil_div(pages, 512)
    pml4, pdpt = layout.page_tables, layout.page_tables + PAGE_4K
    first_pd = pdpt + PAGE_4K
    if first_pd + n_pd * PAGE_4K > layout.page_tables_end:
        room = (layout.page_tables_end - first_pd) // PAGE_4K
        raise ValueError(f"{ram_size:#x} bytes of RAM need {n_pd} page directories; "
                         f"the layout has room for {room} ({room} GiB)")
    out = [(pml4, struct.pack("<Q", pdpt | _TABLE).ljust(PAGE_4K, b"\0"), "PML4"),
           (pdpt, b"".join(struct.pack("<Q", first_pd + i * PAGE_4K | _TABLE)
                           for i in range(n_pd)).ljust(PAGE_4K, b"\0"), "PDPT")]
    for i in range(n_pd):
        count = min(512, pages - i * 512)
        pd = b"".join(struct.pack("<Q", (i * 512 + j) * PAGE_2M | _TABLE | PAGE_PSE)
                      for j in range(count))
        out.append((first_pd + i * PAGE_4K, pd.ljust(PAGE_4K, b"\0"),
                    f"page directory {i}: {count} x 2 MiB pages"))
    return out


def setup_mode(mode: CpuMode | str, sregs: Sregs, memory: GuestWriter, *, ram_size: int,
               layout: BootLayout = DEFAULT_LAYOUT) -> ModeSetup:
    """Write the tables `mode` needs into guest memory and return the sregs that use them.

    Real mode resets the segments to base 0 (so RIP is the linear address, below 64 KiB).
    The other modes load flat 4 GiB segments from the GDT at `layout.gdt`, a busy TSS in
    TR (VM entry demands a usable TR, SDM Vol. 3C "Checks on Guest Segment Registers"),
    and an empty IDT, so any exception becomes a triple fault that KVM reports as
    KVM_EXIT_SHUTDOWN instead of a jump through garbage. The control register values
    follow SDM Vol. 3A 9.9 (protected mode) and 9.8.5 (IA-32e mode).
    """
    mode = CpuMode(mode)
    writes: list[tuple[int, int, str]] = []

    def write(gpa: int, data: bytes, what: str) -> None:
        memory.write(gpa, data)
        writes.append((gpa, len(data), what))

    if mode is CpuMode.REAL:
        data = Segment(base=0, limit=0xFFFF, selector=0, type=SEG_TYPE_DATA_RW, present=1, s=1)
        new = sregs.replace(cs=data.replace(type=SEG_TYPE_CODE_XR), ds=data, es=data,
                            fs=data, gs=data, ss=data, cr0=CR0_ET | CR0_NE, cr3=0, cr4=0,
                            efer=0)
        return ModeSetup(new, writes, "Real mode: CS, DS, ES, FS, GS and SS have selector 0 "
                         "and base 0, so RIP and RSP are linear addresses below 64 KiB; "
                         "CR0.PE = 0, no tables written.")

    segs = gdt_segments(layout)
    write(layout.gdt, build_gdt(layout), f"GDT: null, code32 {SEL_CODE32:#x}, data "
          f"{SEL_DATA:#x}, code64 {SEL_CODE64:#x}, TSS {SEL_TSS:#x}")
    write(layout.tss, bytes(TSS_SIZE), "TSS (zeroed)")
    cr0, cr3, cr4, efer = CR0_PE | CR0_ET | CR0_NE, 0, 0, 0
    code = segs["code32"]
    tables: list[tuple[int, bytes, str]] = []
    if mode is CpuMode.PROTECTED:
        detail = "paging off."
    elif mode is CpuMode.PAGED:
        tables = _paged32_tables(layout, ram_size)
        cr0, cr3, cr4 = cr0 | CR0_PG, layout.page_tables, CR4_PSE
        detail = f"CR4 = PSE (4 MiB pages), CR3 = {cr3:#x}, identity map in"
    else:
        tables = _long_tables(layout, ram_size)
        cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
        cr3, cr4, efer = layout.page_tables, CR4_PAE, EFER_LME | EFER_LMA
        code = segs["code64"]
        detail = (f"CS.L = 1 selects 64-bit code; CR4 = PAE, EFER = LME|LMA, "
                  f"CR3 = {cr3:#x}, identity map in")
    for gpa, table, what in tables:
        write(gpa, table, what)
    if tables:
        detail += " " + ", ".join(what for _, _, what in tables) + "."
    data = segs["data"]
    new = sregs.replace(
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=segs["tss"],
        gdt=DTable(base=layout.gdt, limit=_GDT_SIZE - 1), idt=DTable(base=0, limit=0),
        cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)
    text = (f"{mode.value.capitalize()} mode: GDT at {layout.gdt:#x}, CS = {code.selector:#x}, "
            f"DS = ES = FS = GS = SS = {SEL_DATA:#x} (flat 4 GiB), TR = {SEL_TSS:#x}, "
            f"CR0 = {'|'.join(decode_bits(cr0, CR0_BITS))}; {detail}")
    return ModeSetup(new, writes, text)


def initial_regs(mode: CpuMode | str, entry: int, stack: int) -> Regs:
    """General registers to start at `entry` with the stack pointer at `stack`.

    RFLAGS = 0x2 (only the always-one bit 1, interrupts off). In real mode `setup_mode`
    leaves CS and SS at base 0, so `entry` and `stack` must fit in 16 bits; in the 32-bit
    modes they must fit in 32 bits.
    """
    mode = CpuMode(mode)
    bits = {CpuMode.REAL: 16, CpuMode.LONG: 64}.get(mode, 32)
    for name, value in (("entry", entry), ("stack", stack)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} {value:#x} does not fit the {bits}-bit offsets "
                             f"of {mode.value} mode")
    return Regs(rip=entry, rsp=stack, rflags=0x2)


__all__ = [
    "CpuMode", "BootLayout", "DEFAULT_LAYOUT", "ModeSetup", "setup_mode", "initial_regs",
    "encode_descriptor", "decode_descriptor", "gdt_segments", "build_gdt",
    "SEL_CODE32", "SEL_DATA", "SEL_CODE64", "SEL_TSS",
]
