"""A vCPU's registers at one moment, and what changed between two moments."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..kvm.state import DebugRegs, Regs, SEGMENT_NAMES, Sregs

_REG_NAMES = tuple(f.name for f in fields(Regs))
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass(frozen=True)
class RegisterSnapshot:
    regs: Regs
    sregs: Sregs
    debugregs: DebugRegs | None = None

    @classmethod
    def capture(cls, vcpu) -> "RegisterSnapshot":
        return cls(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_debugregs())

    def flat(self) -> dict[str, int]:
        """Every register as name -> value: GPRs, RIP, RFLAGS, segment selectors and bases,
        GDTR/IDTR, control registers, EFER and (when read) the debug registers."""
        values = {name: getattr(self.regs, name) for name in _REG_NAMES}
        for name in SEGMENT_NAMES:
            segment = getattr(self.sregs, name)
            values[name] = segment.selector
            values[f"{name}.base"] = segment.base
            values[f"{name}.limit"] = segment.limit
        for name in ("gdt", "idt"):
            table = getattr(self.sregs, name)
            values[f"{name}.base"], values[f"{name}.limit"] = table.base, table.limit
        values.update({name: getattr(self.sregs, name) for name in _CONTROL})
        if self.debugregs is not None:
            values.update({f"dr{i}": address for i, address in enumerate(self.debugregs.db)})
            values["dr6"], values["dr7"] = self.debugregs.dr6, self.debugregs.dr7
        return values

    def diff(self, other: "RegisterSnapshot") -> dict[str, tuple[int, int]]:
        """Registers whose value differs in `other`: name -> (before, after)."""
        mine, theirs = self.flat(), other.flat()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


def read_msrs(vcpu, indices) -> dict[int, int]:
    """KVM_GET_MSRS of every MSR in `indices` the vCPU will give. KVM stops at the first MSR
    it refuses (KVM_GET_MSR_INDEX_LIST names what the kernel can save, not what this vCPU
    has: Hyper-V's MSRs without Hyper-V in its CPUID, on some kernels): that one is left
    out and the rest are read on."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        read = vcpu.get_msrs(rest)
        values.update(read)
        rest = rest[len(read) + 1:]
    return values


def write_msrs(vcpu, values: dict[int, int]) -> list[int]:
    """KVM_SET_MSRS of all of `values`, on past any MSR KVM refuses; returns the refused."""
    refused: list[int] = []
    rest = list(values.items())
    while rest:
        written = vcpu.set_msrs(dict(rest))
        if written < len(rest):
            refused.append(rest[written][0])
        rest = rest[written + 1:]
    return refused


@dataclass
class VcpuState:
    """Everything QEMU saves of a vCPU for migration (kvm_arch_get_registers): registers,
    FPU, XCRs, MSRs, pending events, MP state and debug registers. Parts an accelerator
    does not offer are left out (None)."""
    regs: Regs
    sregs: Sregs
    msrs: dict[int, int]
    fpu: dict | None = None
    xcrs: dict | None = None
    vcpu_events: dict | None = None
    mp_state: int | None = None
    debugregs: object | None = None

    @classmethod
    def capture(cls, vcpu, msr_indices: list[int] = (), parts: tuple[str, ...] = ()) -> "VcpuState":
        """Registers, the MSRs in `msr_indices`, and the `parts` the accelerator offers
        (its `capabilities.vcpu_state`)."""
        optional = {name: getattr(vcpu, f"get_{name}")() for name in parts}
        msrs = read_msrs(vcpu, msr_indices)
        return cls(vcpu.get_regs(), vcpu.get_sregs(), msrs, **optional)

    def restore(self, vcpu) -> None:
        """In kvm_arch_put_registers' order: regs, FPU, XCRs, sregs, MSRs, MP state,
        events, debug registers. KVM may refuse to write back an MSR it gave: e.g.
        MSR_KVM_ASYNC_PF_INT without the in-kernel LAPIC, where it cannot have changed
        either. Such an MSR is fine if it still holds the saved value; one that does not is
        reported once everything else is restored (QEMU, which sets no such MSR, would
        abort)."""
        vcpu.set_regs(self.regs)
        if self.fpu is not None:
            vcpu.set_fpu(self.fpu)
        if self.xcrs is not None:
            vcpu.set_xcrs(self.xcrs)
        vcpu.set_sregs(self.sregs)
        refused = write_msrs(vcpu, self.msrs)
        if self.mp_state is not None:
            vcpu.set_mp_state(self.mp_state)
        if self.vcpu_events is not None:
            vcpu.set_vcpu_events(self.vcpu_events)
        if self.debugregs is not None:
            vcpu.set_debugregs(self.debugregs)
        now = read_msrs(vcpu, refused)
        lost = [i for i in refused if now.get(i) != self.msrs[i]]
        if lost:
            raise ValueError("KVM refused to write back MSRs that have changed since: "
                             + ", ".join(f"{i:#x}={self.msrs[i]:#x}" for i in lost))
