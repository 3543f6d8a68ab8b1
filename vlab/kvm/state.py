"""vCPU register state as plain values, shaped like the kernel's structs.

`struct kvm_regs`, `struct kvm_segment`, `struct kvm_dtable` and `struct kvm_sregs` become
frozen dataclasses with the kernel's field names, so a learner reading `<linux/kvm.h>` sees
the same words here, and the software accelerator can hand back the very same types.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass(frozen=True)
class Regs:
    """`struct kvm_regs`: general-purpose registers, RIP and RFLAGS."""
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set

    replace = replace


@dataclass(frozen=True)
class Segment:
    """`struct kvm_segment`: a segment register with its hidden descriptor cache."""
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the kernel's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    replace = replace


@dataclass(frozen=True)
class DTable:
    """`struct kvm_dtable`: GDTR or IDTR."""
    base: int = 0
    limit: int = 0xFFFF

    replace = replace


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(frozen=True)
class Sregs:
    """`struct kvm_sregs`: segments, descriptor tables, control registers, EFER."""
    cs: Segment = Segment(selector=0, type=11)
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment(type=11, s=0)
    ldt: Segment = Segment(type=2, s=0)
    gdt: DTable = DTable()
    idt: DTable = DTable()
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    replace = replace


@dataclass(frozen=True)
class DebugRegs:
    """`struct kvm_debugregs`: DR0-DR3, DR6, DR7."""
    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    flags: int = 0

    replace = replace


@dataclass(frozen=True)
class CpuidEntry:
    """`struct kvm_cpuid_entry2`: one CPUID leaf/subleaf and the registers it returns."""
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    replace = replace


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


__all__ = ["Regs", "Segment", "DTable", "Sregs", "DebugRegs", "CpuidEntry", "GPR_NAMES",
           "SEGMENT_NAMES", "field_names"]
