"""The MSRs the software CPU has: those QEMU's TCG `helper_rdmsr`/`helper_wrmsr` implement.

KVM_GET_MSRS/KVM_SET_MSRS stop at the first MSR KVM does not know; tcg does the same with
the MSRs Unicorn's CPU keeps, read and written through Unicorn's `msr_read`/`msr_write`.
The guest's own RDMSR and WRMSR also go to QEMU's helpers and never exit (Unicorn 2.1 has
no RDMSR/WRMSR hooks): an MSR QEMU does not know reads as 0 and ignores writes, where KVM
would inject #GP (or exit with KVM_EXIT_X86_RDMSR/WRMSR when asked to).
"""
from __future__ import annotations

from ...x86 import MSR_EFER

WRITABLE = frozenset({
    0x174, 0x175, 0x176,                     # SYSENTER_CS, _ESP, _EIP
    0x17A, 0x1A0,                            # MCG_STATUS, MISC_ENABLE
    *range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270), 0x2FF,  # MTRRs
    0x277,                                   # PAT
    MSR_EFER, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # EFER, STAR, LSTAR, CSTAR, FMASK
    0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,        # FS/GS/KERNEL_GS_BASE, TSC_AUX
    0xC0010117,                              # VM_HSAVE_PA
})
READABLE = WRITABLE | {0xFE, 0x179, 0x17B}  # MTRRcap, MCG_CAP, MCG_CTL: read-only here
