"""Exercise 3: hide a CPU feature with KVM_SET_CPUID2 (kvm_arch_init_vcpu, `-cpu ...,-feat`).

The student writes `hide_feature(entries, function, register, bit)`, the CPUID table with
one feature bit cleared, as QEMU's `-cpu host,-nx` does before KVM_SET_CPUID2. The check
hides NX (leaf 0x80000001, EDX bit 20) and runs a guest that executes CPUID on a vCPU given
the table as it was and on one given the student's table. The feature is in leaf 0x80000001
because every backend's guest reads that leaf from the table; on kvm_pvm, leaves 1 and 7
show the host's bits whatever the table says (`Backend.cpuid_raw_leaves`), so a feature
there cannot be hidden on every backend.
"""
from __future__ import annotations

from ..kvm.state import CpuidEntry
from ..machine.assembler import assemble
from .feedback import CheckFailed, call, passed
from .guest import CODE_GPA, GuestVm, describe_end

EXERCISE = "hide a CPUID feature"
LEAF, REGISTER, BIT, FEATURE = 0x80000001, "edx", 20, "NX (no-execute pages)"
RESULT_GPA = 0x500
GUEST = f"""\
bits 16
org {CODE_GPA:#x}
    mov eax, {LEAF:#x}
    xor ecx, ecx
    cpuid                      ; KVM answers it in the kernel, from the vCPU's table
    mov [{RESULT_GPA:#x}], {REGISTER}
    hlt
"""


def _guest_sees(table: list[CpuidEntry]):
    """The register the guest's CPUID returns for LEAF on a vCPU given `table`, and the
    backend; (None, why) if the guest did not halt."""
    with GuestVm(cpuid=table) as guest:
        guest.start_real_mode(assemble(GUEST).code)
        outcome = guest.run()
        if not outcome.halted:
            return None, describe_end(outcome)
        return guest.memory.read_u32(RESULT_GPA), guest.backend


def _entry(table, function: int, index: int = 0):
    return next((e for e in table if e.function == function and e.index == index), None)


def _table_problems(before: list[CpuidEntry], after) -> list[str]:
    if not isinstance(after, list) or not all(isinstance(e, CpuidEntry) for e in after):
        return [f"`hide_feature` returned {type(after).__name__}; return the list of "
                f"CpuidEntry for KVM_SET_CPUID2 (entries are frozen: entry.replace(edx=...))."]
    out = []
    keys = lambda table: [(e.function, e.index) for e in table]  # noqa: E731
    if keys(after) != keys(before):
        out.append(f"the table's leaves changed ({len(before)} entries before, {len(after)} "
                   f"after): keep every leaf, change one bit of one register.")
    entry = _entry(after, LEAF)
    if entry is not None and getattr(entry, REGISTER) >> BIT & 1:
        out.append(f"leaf {LEAF:#x} {REGISTER.upper()} still has bit {BIT} set in the table "
                   f"you returned ({getattr(entry, REGISTER):#010x}): clear it with "
                   f"value & ~(1 << bit).")
    changed = [f"leaf {b.function:#x}.{b.index} {r.upper()} {getattr(b, r):#x} -> "
               f"{getattr(a, r):#x}" for b, a in zip(before, after)
               for r in ("eax", "ebx", "ecx", "edx")
               if getattr(b, r) != getattr(a, r) and not (
                   (b.function, b.index, r) == (LEAF, 0, REGISTER)
                   and getattr(b, r) ^ getattr(a, r) == 1 << BIT)]
    if changed:
        out.append("other bits changed too: " + "; ".join(changed[:4])
                   + ". Hide one feature, leave the rest as the host offers it.")
    return out


def check_cpuid(hide_feature) -> None:
    """Hide NX with the student's function and show that the guest no longer sees it."""
    with GuestVm() as probe:
        supported = probe.accel.get_supported_cpuid()
    if not (_entry(supported, LEAF) and getattr(_entry(supported, LEAF), REGISTER) >> BIT & 1):
        raise CheckFailed(EXERCISE, [f"this host's accelerator offers no {FEATURE} in leaf "
                                     f"{LEAF:#x}: there is nothing to hide here."])
    table = call(EXERCISE, hide_feature, list(supported), LEAF, REGISTER, BIT)
    problems = _table_problems(supported, table)
    if problems:
        raise CheckFailed(EXERCISE, problems)
    before, backend = _guest_sees(supported)
    after, why = _guest_sees(table)
    if before is None or after is None:
        end = backend if before is None else why
        raise CheckFailed(EXERCISE, [f"the CPUID guest did not halt: {end}"])
    if after >> BIT & 1:
        raise CheckFailed(EXERCISE, [f"the guest still sees {FEATURE}: CPUID {LEAF:#x} "
                                     f"returned {REGISTER.upper()}={after:#010x} on "
                                     f"{backend.label}."])
    facts = [
        f"on {backend.label}: with the host's table the guest's CPUID {LEAF:#x} returned "
        f"{REGISTER.upper()}={before:#010x} ({FEATURE}: bit {BIT} = {before >> BIT & 1})",
        f"with yours: {REGISTER.upper()}={after:#010x} (bit {BIT} = 0); the other bits are "
        f"{'unchanged' if before & ~(1 << BIT) == after else 'as KVM adjusts them'}"]
    if backend.cpuid_raw_leaves:
        leaves = ", ".join(f"{leaf:#x}" for leaf in backend.cpuid_raw_leaves)
        facts.append(f"a feature in leaves {leaves} would have stayed visible here: on "
                     f"{backend.label} the guest reads the host's bits there")
    passed(EXERCISE, facts)
