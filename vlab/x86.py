"""Layer 0: facts of the x86 architecture that every layer needs, stated once.

Bit positions of CR0, CR4, EFER and RFLAGS (SDM Vol. 3A 2.5, 2.2.1; Vol. 1 3.4.3), the MSRs
vlab names, the page size, the four debug-address registers, instruction prefixes, and the
code size the CPU decodes in. Imports nothing, so the kernel binding, the accelerators, the
machine, the lab and the views can all import it.
"""
from __future__ import annotations

CR0_BITS = {"PE": 0, "MP": 1, "EM": 2, "TS": 3, "ET": 4, "NE": 5, "WP": 16, "AM": 18,
            "NW": 29, "CD": 30, "PG": 31}
CR4_BITS = {"VME": 0, "PVI": 1, "TSD": 2, "DE": 3, "PSE": 4, "PAE": 5, "MCE": 6, "PGE": 7,
            "PCE": 8, "OSFXSR": 9, "OSXMMEXCPT": 10, "UMIP": 11, "LA57": 12, "VMXE": 13,
            "SMXE": 14, "FSGSBASE": 16, "PCIDE": 17, "OSXSAVE": 18, "KL": 19, "SMEP": 20,
            "SMAP": 21, "PKE": 22, "CET": 23, "PKS": 24, "UINTR": 25, "LAM_SUP": 28}
EFER_BITS = {"SCE": 0, "LME": 8, "LMA": 10, "NXE": 11, "SVME": 12, "LMSLE": 13,
             "FFXSR": 14, "TCE": 15, "AUTOIBRS": 21}
# IOPL is a two-bit field (bits 12-13); each of its bits gets a name.
RFLAGS_BITS = {"CF": 0, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10,
               "OF": 11, "IOPL0": 12, "IOPL1": 13, "NT": 14, "RF": 16, "VM": 17, "AC": 18,
               "VIF": 19, "VIP": 20, "ID": 21}

CR0_PE, CR0_MP, CR0_ET, CR0_NE = (1 << CR0_BITS[n] for n in ("PE", "MP", "ET", "NE"))
CR0_NW, CR0_CD, CR0_PG = (1 << CR0_BITS[n] for n in ("NW", "CD", "PG"))
CR4_PSE, CR4_PAE, CR4_OSFXSR = (1 << CR4_BITS[n] for n in ("PSE", "PAE", "OSFXSR"))
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = (1 << EFER_BITS[n] for n in ("SCE", "LME", "LMA", "NXE"))
RFLAGS_TF, RFLAGS_IF, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = (
    1 << RFLAGS_BITS[n] for n in ("TF", "IF", "RF", "VM", "AC"))
RFLAGS_IOPL = 3 << RFLAGS_BITS["IOPL0"]

# Segment types (SDM Vol. 3A 3.4.5.1, Table 3-1 and 3-2); the accessed bit is preset so the
# CPU never has to write it back into the GDT.
SEG_TYPE_DATA_RW = 3    # read/write, accessed
SEG_TYPE_CODE_XR = 11   # execute/read, accessed
SEG_TYPE_TSS_BUSY = 11  # system type: busy 32/64-bit TSS, what LTR leaves in TR

# MSRs by their SDM names (Vol. 4).
MSR_IA32_TSC = 0x10
MSR_IA32_UCODE_REV = 0x8B
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_SYSENTER_CS = 0x174
MSR_EFER = 0xC0000080

# CPUID.1:ECX bit 31, which no CPU sets and every hypervisor offers: how a guest knows it is
# one, and looks for the hypervisor's signature leaf (0x40000000).
CPUID_HYPERVISOR = (1, 0, "ecx", 31)   # (leaf, subleaf, register, bit)


def with_hypervisor_bit(entries: list) -> list:
    """KVM_GET_SUPPORTED_CPUID's entries with the hypervisor bit, which KVM does not report
    but QEMU always offers (kvm_arch_get_supported_cpuid, target/i386/kvm.c)."""
    leaf, subleaf, reg, bit = CPUID_HYPERVISOR
    return [e.replace(**{reg: getattr(e, reg) | 1 << bit})
            if (e.function, e.index) == (leaf, subleaf) else e for e in entries]


PAGE_SIZE = 4096
HW_BREAKPOINTS = 4       # DR0-DR3
MAX_INSN = 15            # bytes in the longest instruction

# Instruction prefixes (SDM Vol. 2A 2.1.1): LOCK, the segment overrides and operand size;
# the two REP forms; address size; and REX (0x40-0x4F) in 64-bit code.
LEGACY_PREFIXES = frozenset({0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66})
REP_PREFIXES = frozenset({0xF2, 0xF3})
ADDRESS_SIZE_PREFIX = 0x67
PREFIXES = LEGACY_PREFIXES | REP_PREFIXES | {ADDRESS_SIZE_PREFIX}


def opcode_offset(code: bytes, long_mode: bool) -> int | None:
    """Where the instruction at the start of `code` has its opcode: past its prefixes (and a
    REX byte, in 64-bit code); None when `code` holds nothing else."""
    for offset, byte in enumerate(code):
        if byte not in PREFIXES and not (long_mode and 0x40 <= byte <= 0x4F):
            return offset
    return None


def code_bits(sregs) -> int:
    """The code size the CPU decodes in: 64 in long mode with CS.L, 32 in protected mode
    with CS.D, else 16 (real mode, or a 16-bit protected-mode segment)."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    if sregs.cr0 & CR0_PE and sregs.cs.db:
        return 32
    return 16


def decode_bits(value: int, table: dict[str, int]) -> list[str]:
    """Names of the set bits of `value`, lowest first; set bits the table lacks as 'bitN'."""
    names = {bit: name for name, bit in table.items()}
    return [names.get(bit, f"bit{bit}") for bit in range(value.bit_length()) if value >> bit & 1]
