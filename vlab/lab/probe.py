"""Ask the guest, not the table: run CPUID inside a throwaway VM and read what came back."""
from __future__ import annotations

from ..kvm.exits import IoOut
from ..machine.assembler import assemble
from ..machine.builder import build_board

_ORG = 0x1000


def probe_cpuid(accel, entries, queries: list[tuple[int, int]]) -> list[dict[str, int]]:
    """For each (leaf, subleaf), the EAX/EBX/ECX/EDX a real-mode guest's CPUID returns on a
    vCPU given `entries` with KVM_SET_CPUID2."""
    source = "".join(f"mov eax, {leaf:#x}\nmov ecx, {subleaf:#x}\ncpuid\nout 0x80, al\n"
                     for leaf, subleaf in queries) + "hlt\n"
    machine = build_board(accel, memory=1 << 20, cpuid=entries)
    try:
        vcpu = machine.runners[0].vcpu
        machine.memory.write(_ORG, assemble(source, bits=16, org=_ORG).code)
        machine.setup_cpu(vcpu, "real", _ORG)
        answers = []
        while len(answers) < len(queries):
            exit = vcpu.run()
            if exit.__class__ is IoOut:
                regs = vcpu.get_regs()
                answers.append({r: getattr(regs, "r" + r[1:]) & 0xFFFFFFFF
                                for r in ("eax", "ebx", "ecx", "edx")})
            elif exit.__class__.__name__ != "Interrupted":
                raise RuntimeError(f"CPUID probe guest stopped early: {exit.describe()}")
        return answers
    finally:
        machine.close()
