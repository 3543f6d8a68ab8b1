"""A vCPU's registers at one moment, and what changed between two moments."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..kvm.state import Regs, SEGMENT_NAMES, Sregs

_REG_NAMES = tuple(f.name for f in fields(Regs))
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass(frozen=True)
class RegisterSnapshot:
    regs: Regs
    sregs: Sregs

    @classmethod
    def capture(cls, vcpu) -> "RegisterSnapshot":
        return cls(vcpu.get_regs(), vcpu.get_sregs())

    def flat(self) -> dict[str, int]:
        """Every register as name -> value: GPRs, RIP, RFLAGS, segment selectors and bases,
        GDTR/IDTR, control registers and EFER."""
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
        return values

    def diff(self, other: "RegisterSnapshot") -> dict[str, tuple[int, int]]:
        """Registers whose value differs in `other`: name -> (before, after)."""
        mine, theirs = self.flat(), other.flat()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}
