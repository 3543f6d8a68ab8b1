"""The CPU state Unicorn's API cannot set: segment descriptor caches, EFER.LMA, `hflags`.

KVM_SET_SREGS writes each segment's hidden part (base, limit, attributes) directly, as VM
entry loads it from the VMCS. Unicorn cannot: on its 64-bit engine `reg_write(UC_X86_REG_CS,
selector)` stores the selector alone, and EFER.LMA is read-only to WRMSR (only setting CR0.PG
turns it on). All of it lives in QEMU's `CPUX86State`, which `uc_context_save` copies out as
bytes and `uc_context_restore` copies back. This module finds the fields in that copy by
writing known values through the API and looking for them (once per process), converts
`Segment` to QEMU's `SegmentCache` exactly as QEMU's own KVM glue does (`get_seg`/`set_seg`
in target/i386/kvm.c), and recomputes `hflags`, the mode bits QEMU's translator keys on
(16/32/64-bit code, CPL, protected mode), as QEMU's `x86_update_hflags` does.
"""
from __future__ import annotations

import ctypes
import functools
import struct
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as x86

from ...kvm.state import DTable, Segment, Sregs
from ...x86 import CR0_PE, CR4_OSFXSR, EFER_LMA, MSR_EFER, RFLAGS_IOPL, RFLAGS_TF, RFLAGS_VM


# QEMU's SegmentCache.flags: the descriptor's high dword (target/i386/cpu.h DESC_*).
DESC_TYPE_SHIFT, DESC_S, DESC_DPL_SHIFT, DESC_P = 8, 1 << 12, 13, 1 << 15
DESC_AVL, DESC_L, DESC_B, DESC_G = 1 << 20, 1 << 21, 1 << 22, 1 << 23

# QEMU's hflags (target/i386/cpu.h HF_*).
HF_CPL, HF_CS32, HF_SS32, HF_ADDSEG, HF_PE = 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7
HF_MP, HF_EM, HF_TS = 1 << 9, 1 << 10, 1 << 11  # CR0.MP, EM, TS moved up by 8 bits
HF_LMA, HF_CS64, HF_OSFXSR = 1 << 14, 1 << 15, 1 << 22
_HF_FROM_RFLAGS = RFLAGS_TF | RFLAGS_IOPL | RFLAGS_VM  # HF_TF, HF_IOPL, HF_VM share the bits
_HF_RECOMPUTED = (HF_CPL | HF_PE | HF_MP | HF_EM | HF_TS | _HF_FROM_RFLAGS | HF_OSFXSR
                  | HF_LMA | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG)

# SegmentCache {u32 selector; u64 base; u32 limit; u32 flags}; CPUX86State keeps
# segs[ES, CS, SS, DS, FS, GS] then ldt, tr, gdt, idt, then cr[5].
_SEGMENT = struct.Struct("<I4xQII")
_SEGMENT_ORDER = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class UnsupportedUnicorn(RuntimeError):
    """This Unicorn build keeps its CPU state in a layout vlab does not recognise."""


@dataclass(frozen=True)
class _Layout:
    """Byte offsets of the fields in a saved Unicorn x86-64 context."""
    segments: int
    hflags: int
    efer: int


@functools.cache
def _layout() -> _Layout:
    """Find the fields by writing marker values through Unicorn's API into a scratch engine."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    markers = {"es": 0x5E51, "cs": 0x5C51, "ss": 0x5551, "ds": 0x5D51}
    for name, selector in markers.items():  # the 64-bit engine stores the selector alone
        uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), selector)
    uc.reg_write(x86.UC_X86_REG_FS_BASE, 0xF5BA5E0F5BA5E0)
    uc.msr_write(MSR_EFER, 0x901)  # SCE|LME|NXE; the engine adds LMA: 0xD01
    blob = bytes(uc.context_save())
    segments = blob.find(_U32.pack(markers["es"]))
    efer = blob.find(_U64.pack(0xD01))
    found = segments > 8 and efer > 0 and all(
        _U32.unpack_from(blob, segments + 24 * _SEGMENT_ORDER.index(name))[0] == selector
        for name, selector in markers.items())
    if not found or _U64.unpack_from(blob, segments + 4 * 24 + 8)[0] != 0xF5BA5E0F5BA5E0:
        raise UnsupportedUnicorn("cannot find the segment registers in Unicorn's saved CPU "
                                 "context; vlab's tcg accelerator needs Unicorn 2.1")
    layout = _Layout(segments, segments - 8, efer)
    if _hflags(blob, layout) & (HF_LMA | HF_CS64 | HF_PE) != HF_LMA | HF_CS64 | HF_PE:
        raise UnsupportedUnicorn("Unicorn's saved CPU context has no QEMU hflags where "
                                 "vlab expects them; vlab's tcg accelerator needs Unicorn 2.1")
    return layout


def _hflags(blob: bytes, layout: _Layout) -> int:
    return _U32.unpack_from(blob, layout.hflags)[0]


def segment_to_flags(seg: Segment) -> int:
    """kvm_segment -> SegmentCache.flags (QEMU's `get_seg`): an unusable segment has none."""
    if seg.unusable:
        return 0
    return ((seg.type << DESC_TYPE_SHIFT) | (DESC_P if seg.present else 0)
            | (seg.dpl << DESC_DPL_SHIFT) | (DESC_B if seg.db else 0) | (DESC_S if seg.s else 0)
            | (DESC_L if seg.l else 0) | (DESC_G if seg.g else 0)
            | (DESC_AVL if seg.avl else 0))


def segment_from_cache(selector: int, base: int, limit: int, flags: int) -> Segment:
    """SegmentCache -> kvm_segment (QEMU's `set_seg`): not present means unusable."""
    present = int(bool(flags & DESC_P))
    return Segment(base=base, limit=limit, selector=selector,
                   type=(flags >> DESC_TYPE_SHIFT) & 15, present=present,
                   dpl=(flags >> DESC_DPL_SHIFT) & 3, db=int(bool(flags & DESC_B)),
                   s=int(bool(flags & DESC_S)), l=int(bool(flags & DESC_L)),
                   g=int(bool(flags & DESC_G)), avl=int(bool(flags & DESC_AVL)),
                   unusable=1 - present)


def compute_hflags(old: int, sregs: Sregs, rflags: int) -> int:
    """QEMU's `x86_update_hflags`: the mode bits TCG translates by, from the registers."""
    flags = {name: segment_to_flags(getattr(sregs, name)) for name in ("cs", "ss")}
    hflags = old & ~_HF_RECOMPUTED
    hflags |= (flags["ss"] >> DESC_DPL_SHIFT) & HF_CPL
    hflags |= HF_PE if sregs.cr0 & CR0_PE else 0
    hflags |= (sregs.cr0 << 8) & (HF_MP | HF_EM | HF_TS)
    hflags |= rflags & _HF_FROM_RFLAGS
    hflags |= HF_OSFXSR if sregs.cr4 & CR4_OSFXSR else 0
    hflags |= HF_LMA if sregs.efer & EFER_LMA else 0
    if hflags & HF_LMA and flags["cs"] & DESC_L:
        return hflags | HF_CS32 | HF_SS32 | HF_CS64
    hflags |= HF_CS32 if flags["cs"] & DESC_B else 0
    hflags |= HF_SS32 if flags["ss"] & DESC_B else 0
    if not sregs.cr0 & CR0_PE or rflags & RFLAGS_VM or not hflags & HF_CS32:
        return hflags | HF_ADDSEG
    if sregs.ds.base | sregs.es.base | sregs.ss.base:
        hflags |= HF_ADDSEG
    return hflags


def read_segments(uc: Uc) -> dict[str, Segment]:
    """CS, DS, ES, FS, GS, SS, TR and LDT with their descriptor caches, as the CPU holds them
    now (the guest may have reloaded them since `write_sregs`)."""
    layout = _layout()
    blob = bytes(uc.context_save())
    return {name: segment_from_cache(*_SEGMENT.unpack_from(blob, layout.segments + 24 * i))
            for i, name in enumerate(_SEGMENT_ORDER)}


def read_sregs(uc: Uc, shadow: Sregs) -> Sregs:
    """KVM_GET_SREGS: from the CPU, except what Unicorn does not emulate (CR8/TPR, the APIC
    base, pending interrupts), which comes back as `shadow` last had it."""
    gdt, idt = (uc.reg_read(reg) for reg in (x86.UC_X86_REG_GDTR, x86.UC_X86_REG_IDTR))
    return shadow.replace(
        **read_segments(uc), gdt=DTable(base=gdt[1], limit=gdt[2]),
        idt=DTable(base=idt[1], limit=idt[2]),
        cr0=uc.reg_read(x86.UC_X86_REG_CR0), cr2=uc.reg_read(x86.UC_X86_REG_CR2),
        cr3=uc.reg_read(x86.UC_X86_REG_CR3), cr4=uc.reg_read(x86.UC_X86_REG_CR4),
        efer=uc.msr_read(MSR_EFER))


def write_sregs(uc: Uc, sregs: Sregs) -> None:
    """KVM_SET_SREGS: control registers through Unicorn's API (which flushes the TLB and
    updates what derives from them), then segments, EFER and hflags in the saved context."""
    layout = _layout()
    rip = uc.reg_read(x86.UC_X86_REG_RIP)  # leaving long mode through CR0 truncates EIP
    uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
    uc.msr_write(MSR_EFER, sregs.efer & ~EFER_LMA)
    uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
    uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
    uc.reg_write(x86.UC_X86_REG_CR2, sregs.cr2)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
    uc.reg_write(x86.UC_X86_REG_RIP, rip)
    rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    context = uc.context_save()
    base = ctypes.cast(context.context, ctypes.c_void_p).value
    blob = bytes(context)
    for i, name in enumerate(_SEGMENT_ORDER):
        seg = getattr(sregs, name)
        ctypes.memmove(base + layout.segments + 24 * i,
                       _SEGMENT.pack(seg.selector, seg.base, seg.limit, segment_to_flags(seg)),
                       _SEGMENT.size)
    ctypes.memmove(base + layout.efer, _U64.pack(sregs.efer), 8)
    hflags = compute_hflags(_hflags(blob, layout), sregs, rflags)
    ctypes.memmove(base + layout.hflags, _U32.pack(hflags), 4)
    uc.context_restore(context)
