"""The special registers checked the way KVM will check them, before KVM is asked.

KVM_SET_SREGS refuses some states with EINVAL (CR0.PG without PE, a CR4 bit the host cannot
virtualise, EFER.LME without the CPU model's lm) and VM entry refuses others (inconsistent
segments): `check_sregs` names each broken bit in words instead. The software accelerator,
which has no kernel to ask, refuses what KVM_SET_SREGS would (`validate_set_sregs`), so a
state is accepted or refused alike on every accelerator.
"""
from __future__ import annotations

from vlab.kvm.state import Sregs
from vlab.x86 import (CR0_BITS, CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_BITS, CR4_PAE, EFER_BITS,
                      EFER_LMA, EFER_LME, SEG_TYPE_CODE_XR, SEG_TYPE_DATA_RW,
                      SEG_TYPE_TSS_BUSY, decode_bits)

# CR4 bits KVM can ever allow (the complement of CR4_RESERVED_BITS in arch/x86/kvm/x86.h);
# SMXE, KL, PKS and UINTR are architectural but never virtualised by KVM.
_KVM_CR4_KNOWN = sum(1 << CR4_BITS[n] for n in (
    "VME", "PVI", "TSD", "DE", "PSE", "PAE", "MCE", "PGE", "PCE", "OSFXSR", "OSXMMEXCPT",
    "UMIP", "LA57", "VMXE", "FSGSBASE", "PCIDE", "OSXSAVE", "SMEP", "SMAP", "PKE", "CET",
    "LAM_SUP"))
_CR0_KNOWN = sum(1 << b for b in CR0_BITS.values())
_EFER_KNOWN = sum(1 << b for b in EFER_BITS.values())
# IA32_APIC_BASE (SDM Vol. 3A 11.4.4): BSP flag, x2APIC enable (EXTD), xAPIC enable (EN).
_APIC_BSP, _APIC_EXTD, _APIC_EN = 1 << 8, 1 << 10, 1 << 11


class SregsError(ValueError):
    """Special registers KVM_SET_SREGS or VM entry would refuse; `problems` says why."""

    def __init__(self, problems: list[str], heading: str | None = None):
        super().__init__("\n".join(([heading] if heading else []) + problems))
        self.problems = problems


def _names(value: int, table: dict[str, int]) -> str:
    return ", ".join(decode_bits(value, table))


def _segment_problems(sregs: Sregs, long_mode: bool) -> list[str]:
    """VM-entry checks on segments (SDM Vol. 3C "Checks on Guest Segment Registers").

    KVM_SET_SREGS accepts these; the CPU then refuses VM entry and KVM_RUN returns
    KVM_EXIT_FAIL_ENTRY, so they are worth catching first.
    """
    out = []
    cs, ss, tr = sregs.cs, sregs.ss, sregs.tr
    if long_mode and cs.l and cs.db:
        out.append("CS.l and CS.db are both 1: in long mode L=1 with D=1 is reserved. "
                   "Set CS.db = 0 for 64-bit code.")
    if sregs.cr0 & CR0_PE:
        if not (cs.present and cs.s and cs.type in (9, 11, 13, 15)):
            out.append(f"CS (type {cs.type}, s={cs.s}, present={cs.present}) is not a "
                       "present, accessed code segment: set CS.s = 1, CS.present = 1 and "
                       f"CS.type = {SEG_TYPE_CODE_XR} (execute/read, accessed).")
        if ss.present and not ss.unusable and not (ss.s and ss.type in (3, 7)):
            out.append(f"SS (type {ss.type}, s={ss.s}) is not an accessed, writable data "
                       f"segment: set SS.s = 1 and SS.type = {SEG_TYPE_DATA_RW}.")
        for name in ("ds", "es", "fs", "gs"):
            seg = getattr(sregs, name)
            if seg.present and not seg.unusable and not (
                    seg.s and seg.type & 1 and (seg.type & 0xA) != 0x8):
                out.append(f"{name.upper()} (type {seg.type}, s={seg.s}) must be an accessed "
                           f"data or readable code segment: set {name.upper()}.s = 1 and "
                           f"{name.upper()}.type = {SEG_TYPE_DATA_RW}.")
        allowed = (11,) if long_mode else (3, 11)
        if not tr.present or tr.unusable or tr.s or tr.type not in allowed:
            out.append(f"TR (type {tr.type}, s={tr.s}, present={tr.present}) is not a busy "
                       f"TSS: set TR.type = {SEG_TYPE_TSS_BUSY}, TR.s = 0, TR.present = 1.")
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = getattr(sregs, name)
        if not seg.present or seg.unusable:
            continue
        if seg.g and seg.limit & 0xFFF != 0xFFF:
            out.append(f"{name.upper()}.g = 1 but limit {seg.limit:#x} does not end in "
                       "0xfff: kvm_segment.limit is in bytes; use 0xffffffff for 4 GiB.")
        elif not seg.g and seg.limit > 0xFFFFF:
            out.append(f"{name.upper()}.limit {seg.limit:#x} exceeds 20 bits with g = 0: "
                       "set g = 1 (4 KiB granularity).")
    return out


def check_sregs(sregs: Sregs, *, cpuid_has_lm: bool = True, host_cr4_mask: int | None = None,
                maxphyaddr: int = 52) -> list[str]:
    """Every reason KVM would refuse `sregs`, one sentence each, naming the bit and the fix.

    Mirrors KVM's `kvm_is_valid_sregs`, `kvm_is_valid_cr0`, `__kvm_is_valid_cr4`,
    `__kvm_valid_efer` and `kvm_set_apic_base` (all EINVAL from KVM_SET_SREGS) and the
    segment checks of VM entry (KVM_EXIT_FAIL_ENTRY from KVM_RUN). KVM answers only
    "Invalid argument"; this names the culprit. `host_cr4_mask` is the CR4 bits the vCPU's
    CPUID allows (before KVM_SET_CPUID2 only VME..OSXMMEXCPT are), `cpuid_has_lm` whether
    CPUID 0x80000001 EDX.LM is set, `maxphyaddr` the guest's physical address width.
    """
    return (set_sregs_problems(sregs, cpuid_has_lm=cpuid_has_lm, host_cr4_mask=host_cr4_mask,
                               maxphyaddr=maxphyaddr)
            + _segment_problems(sregs, _long_mode(sregs)))


def _long_mode(sregs: Sregs) -> bool:
    return bool(sregs.efer & EFER_LME and sregs.cr0 & CR0_PG)


def set_sregs_problems(sregs: Sregs, *, cpuid_has_lm: bool = True,
                       host_cr4_mask: int | None = None, maxphyaddr: int = 52) -> list[str]:
    """The reasons KVM_SET_SREGS itself would fail with EINVAL (see `check_sregs`)."""
    out = []
    cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
    pe, pg = cr0 & CR0_PE, cr0 & CR0_PG

    # kvm_is_valid_cr0
    if cr0 >> 32:
        out.append(f"CR0 bits 63:32 ({cr0 >> 32:#x}) are reserved (kvm_is_valid_cr0): "
                   "clear them.")
    if cr0 & 0xFFFFFFFF & ~_CR0_KNOWN:
        out.append(f"CR0 {_names(cr0 & 0xFFFFFFFF & ~_CR0_KNOWN, CR0_BITS)} reserved "
                   "(SDM Vol. 3A 2.5): clear it.")
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        out.append("CR0.NW is set without CR0.CD (kvm_is_valid_cr0): not-write-through "
                   "needs cache-disable; clear CR0.NW or set CR0.CD.")
    if pg and not pe:
        out.append("CR0.PG is set without CR0.PE (kvm_is_valid_cr0): paging needs "
                   "protected mode; set CR0.PE or clear CR0.PG.")

    # __kvm_is_valid_cr4
    if cr4 & ~_KVM_CR4_KNOWN:
        out.append(f"CR4 {_names(cr4 & ~_KVM_CR4_KNOWN, CR4_BITS)} reserved for KVM "
                   "(CR4_RESERVED_BITS, __kvm_is_valid_cr4): clear it.")
    if host_cr4_mask is not None and cr4 & _KVM_CR4_KNOWN & ~host_cr4_mask:
        out.append(f"CR4 {_names(cr4 & _KVM_CR4_KNOWN & ~host_cr4_mask, CR4_BITS)} not "
                   "allowed by the vCPU's CPUID (cr4_guest_rsvd_bits): clear it or "
                   "enable the feature with KVM_SET_CPUID2.")

    # __kvm_valid_efer and reserved EFER bits
    if efer & ~_EFER_KNOWN:
        out.append(f"EFER {_names(efer & ~_EFER_KNOWN, EFER_BITS)} reserved (SDM Vol. 3A "
                   "2.2.1): clear it.")
    if efer & (EFER_LME | EFER_LMA) and not cpuid_has_lm:
        out.append("EFER.LME/LMA is set but CPUID 0x80000001 EDX.LM is clear "
                   "(__kvm_valid_efer): keep LM in the KVM_SET_CPUID2 table or stay out "
                   "of long mode.")

    # kvm_is_valid_sregs
    if _long_mode(sregs):
        if not cr4 & CR4_PAE:
            out.append("EFER.LME and CR0.PG are set but CR4.PAE is clear "
                       "(kvm_is_valid_sregs): long mode uses PAE-format page tables; "
                       "set CR4.PAE.")
        if not efer & EFER_LMA:
            out.append("EFER.LME and CR0.PG are set but EFER.LMA is clear "
                       "(kvm_is_valid_sregs): the CPU would be in long mode; set EFER.LMA.")
        if sregs.cr3 >> maxphyaddr:
            out.append(f"CR3 {sregs.cr3:#x} has bits above MAXPHYADDR {maxphyaddr} "
                       "(kvm_vcpu_is_legal_cr3): point CR3 at a PML4 inside guest memory.")
    else:
        if efer & EFER_LMA:
            out.append("EFER.LMA is set without both EFER.LME and CR0.PG "
                       "(kvm_is_valid_sregs): LMA reports active long mode; clear it, or "
                       "set EFER.LME and CR0.PG.")
        if sregs.cs.l:
            out.append("CS.l is set outside long mode (kvm_is_valid_sregs): 64-bit code "
                       "needs EFER.LME, EFER.LMA and CR0.PG; clear CS.l.")

    # kvm_set_apic_base
    apic = sregs.apic_base
    reserved = (0xFF | 1 << 9) | (~0 << maxphyaddr & (1 << 64) - 1)
    if apic & reserved:
        out.append(f"apic_base {apic:#x} sets reserved bits {apic & reserved:#x} "
                   "(kvm_set_apic_base): use 0xfee00900 (EN|BSP at the default base).")
    if apic & _APIC_EXTD and not apic & _APIC_EN:
        out.append("apic_base.EXTD (x2APIC) is set without apic_base.EN "
                   "(kvm_set_apic_base): set EN too, or clear EXTD.")

    return out


def validate_sregs(sregs: Sregs, **kwargs) -> None:
    """Raise `SregsError` listing every problem `check_sregs` finds."""
    problems = check_sregs(sregs, **kwargs)
    if problems:
        raise SregsError(problems)


def validate_set_sregs(sregs: Sregs, **kwargs) -> None:
    """Raise `SregsError` for what KVM_SET_SREGS would refuse with EINVAL."""
    problems = set_sregs_problems(sregs, **kwargs)
    if problems:
        raise SregsError(problems, "KVM_SET_SREGS would refuse these special registers "
                                   "(EINVAL):")
