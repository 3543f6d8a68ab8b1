"""CPUID for the software CPU: the table tcg supports, and how an instruction is answered.

`supported_cpuid()` mirrors what QEMU's "qemu64" CPU model reports (target/i386/cpu.c),
the model Unicorn emulates: vendor AuthenticAMD, family 15 model 107 stepping 1, leaf 1
with the Pentium Pro base set plus SSE/SSE2/SSE3/CX16 (FPU, TSC, MSR, PAE, APIC, CMOV, PSE,
...), leaf 0x80000001 with LM, NX and SYSCALL (and, as on AMD, copies of leaf 1's bits),
the brand string "QEMU Virtual CPU version 2.5+", and 40-bit physical / 48-bit virtual
addresses. Bit 31 of leaf 1 ECX says a hypervisor is present, as QEMU sets it.

`CpuidAnswers.lookup` answers a guest CPUID the way KVM's `kvm_cpuid()` does: an exact
(function, index) match, the index only where the entry says it matters; unless the vendor
is AMD or Hygon, a leaf past the highest of its range reads as the highest basic leaf
(`get_out_of_range_cpuid_entry`); anything else reads zeros.
As on VMX and SVM (unlike kvm_pvm), every leaf comes from the table, leaf 1 and 7 included.
"""
from __future__ import annotations

from ...kvm.state import CpuidEntry

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # (sic) <linux/kvm.h>'s spelling

# Leaf 1 EDX: FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFLUSH
# MMX FXSR SSE SSE2 (QEMU's PPRO_FEATURES | MTRR | CLFLUSH | MCA | PSE36).
LEAF1_EDX = sum(1 << bit for bit in (0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17,
                                     19, 23, 24, 25, 26))
LEAF1_ECX = 1 << 0 | 1 << 13 | 1 << 31          # SSE3, CX16, hypervisor
AMD_ALIASES = 0x0183F3FF                         # leaf 1 EDX bits AMD repeats in 0x80000001
EXT_EDX = (LEAF1_EDX & AMD_ALIASES) | 1 << 11 | 1 << 20 | 1 << 29   # + SYSCALL, NX, LM
EXT_ECX = 1 << 0                                 # LAHF/SAHF in long mode
FAMILY, MODEL, STEPPING = 15, 107, 1
BRAND = b"QEMU Virtual CPU version 2.5+".ljust(48, b"\0")


def _text(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4))


def _signature() -> int:
    return (MODEL >> 4) << 16 | FAMILY << 8 | (MODEL & 15) << 4 | STEPPING


def supported_cpuid() -> list[CpuidEntry]:
    """The "qemu64"-like table (see the module docstring)."""
    ebx, edx, ecx = _text(b"AuthenticAMD")
    brand = _text(BRAND)
    return [
        CpuidEntry(0, eax=7, ebx=ebx, ecx=ecx, edx=edx),
        CpuidEntry(1, eax=_signature(), ebx=8 << 8, ecx=LEAF1_ECX, edx=LEAF1_EDX),  # CLFLUSH 64 B
        CpuidEntry(7, index=0, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
        CpuidEntry(0x80000000, eax=0x80000008, ebx=ebx, ecx=ecx, edx=edx),
        CpuidEntry(0x80000001, eax=_signature(), ecx=EXT_ECX, edx=EXT_EDX),
        *(CpuidEntry(0x80000002 + i, 0, 0, *brand[4 * i:4 * i + 4]) for i in range(3)),
        CpuidEntry(0x80000008, eax=48 << 8 | 40),
    ]


class CpuidAnswers:
    """The vCPU's KVM_SET_CPUID2 table, answering the guest's CPUID instructions."""

    def __init__(self, entries=()):
        self.entries = list(entries)
        self._exact = {(e.function,
                        e.index if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX else None): e
                       for e in self.entries}

    def _find(self, function: int, index: int) -> CpuidEntry | None:
        return self._exact.get((function, index)) or self._exact.get((function, None))

    def lookup(self, function: int, index: int) -> tuple[int, int, int, int]:
        """EAX, EBX, ECX, EDX for CPUID with EAX=`function`, ECX=`index`."""
        entry = self._find(function, index) or self._out_of_range(function, index)
        if entry is None:
            return 0, 0, 0, 0
        return entry.eax, entry.ebx, entry.ecx, entry.edx

    def _out_of_range(self, function: int, index: int) -> CpuidEntry | None:
        basic = self._find(0, 0)
        if basic is None or (basic.ebx, basic.edx, basic.ecx) in _NO_REDIRECT:
            return None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            top = self._find(function & 0xFFFFFF00, 0)
        else:
            top = self._find(0xC0000000 if function >= 0xC0000000 else function & 0x80000000, 0)
        if top is not None and function <= top.eax:
            return None
        return self._find(basic.eax, index)


_NO_REDIRECT = {_text(b"AuthenticAMD"), _text(b"HygonGenuine")}
