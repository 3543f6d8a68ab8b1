"""The register model: a vCPU's registers, decoded, and what the last step changed."""
from __future__ import annotations

from ..x86 import CR0_BITS, CR4_BITS, EFER_BITS, RFLAGS_BITS, decode_bits
from ..machine.snapshot import RegisterSnapshot
from ..kvm.state import GPR_NAMES, SEGMENT_NAMES, Segment
from .observable import Observable

SEGMENT_TYPES = {  # SDM Vol. 3A 3.4.5.1, the type field with S=1
    0: "data RO", 1: "data RO, accessed", 2: "data RW", 3: "data RW, accessed",
    4: "data RO expand-down", 5: "data RO expand-down, accessed", 6: "data RW expand-down",
    7: "data RW expand-down, accessed", 8: "code XO", 9: "code XO, accessed", 10: "code XR",
    11: "code XR, accessed", 12: "code XO conforming", 13: "code XO conforming, accessed",
    14: "code XR conforming", 15: "code XR conforming, accessed"}
SYSTEM_TYPES = {1: "16-bit TSS (available)", 2: "LDT", 3: "16-bit TSS (busy)",
                9: "32/64-bit TSS (available)", 11: "32/64-bit TSS (busy)"}


def describe_segment(segment: Segment) -> str:
    return f"sel={segment.selector:#06x} base={segment.base:#x} limit={segment.limit:#x} " \
           + segment_type(segment)


def segment_type(segment: Segment) -> str:
    """The descriptor's type and flags, e.g. `code XR, accessed, 16-bit, DPL0, present`."""
    kind = (SEGMENT_TYPES if segment.s else SYSTEM_TYPES).get(segment.type, f"type {segment.type}")
    # D/B and L size code and data segments; a system descriptor's type gives its own size.
    size = ["64-bit" if segment.l else ("32-bit" if segment.db else "16-bit")] if segment.s else []
    flags = size + [f"DPL{segment.dpl}", "present" if segment.present else "not present"]
    if segment.g:
        flags.append("4K-granular")
    if segment.unusable:
        flags.append("unusable")
    return f"{kind}, " + ", ".join(flags)


def cpu_mode(snapshot: RegisterSnapshot) -> str:
    """What mode the CPU is in, from CR0.PE/PG, EFER.LMA and CS.L."""
    sregs = snapshot.sregs
    if not sregs.cr0 & 1:
        return "real"
    if sregs.efer & (1 << EFER_BITS["LMA"]):
        return "long (64-bit)" if sregs.cs.l else "long (compatibility)"
    return "protected, paged" if sregs.cr0 & (1 << 31) else "protected"


class RegisterModel(Observable):
    """Registers of one vCPU: the current snapshot, the previous one, and their diff."""

    def __init__(self, vcpu_id: int = 0):
        super().__init__()
        self.vcpu_id = vcpu_id
        self.current: RegisterSnapshot | None = None
        self.previous: RegisterSnapshot | None = None
        self.changed: dict[str, tuple[int, int]] = {}

    def update(self, snapshot: RegisterSnapshot) -> None:
        self.previous, self.current = self.current, snapshot
        self.changed = self.previous.diff(snapshot) if self.previous else {}
        self.notify(changed=self.changed)

    def refresh(self, vcpu) -> None:
        self.update(RegisterSnapshot.capture(vcpu))

    def decoded(self) -> dict[str, list[str]]:
        """Named bits of RFLAGS, CR0, CR4 and EFER."""
        if self.current is None:
            return {}
        s = self.current.sregs
        return {"rflags": decode_bits(self.current.regs.rflags & ~2, RFLAGS_BITS),  # bit 1 is reserved, always 1
                "cr0": decode_bits(s.cr0, CR0_BITS), "cr4": decode_bits(s.cr4, CR4_BITS),
                "efer": decode_bits(s.efer, EFER_BITS)}

    def rows(self) -> list[tuple[str, int, bool]]:
        """(name, value, changed by the last step) for every register a view shows."""
        if self.current is None:
            return []
        flat = self.current.flat()
        names = GPR_NAMES + ("rip", "rflags") + SEGMENT_NAMES + (
            "gdt.base", "gdt.limit", "idt.base", "idt.limit", "cr0", "cr2", "cr3", "cr4", "efer",
            "dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
        return [(name, flat[name], name in self.changed) for name in names if name in flat]

    def __str__(self) -> str:
        if self.current is None:
            return f"vCPU {self.vcpu_id}: no registers read yet"
        regs, s = self.current.regs, self.current.sregs
        lines = [f"vCPU {self.vcpu_id} in {cpu_mode(self.current)} mode"]
        for i in range(0, 16, 4):
            lines.append("  " + "  ".join(
                f"{n:>3}={getattr(regs, n):016x}{'*' if n in self.changed else ' '}"
                for n in GPR_NAMES[i:i + 4]))
        decoded = self.decoded()
        lines.append(f"  rip={regs.rip:016x}{'*' if 'rip' in self.changed else ' '} "
                     f"rflags={regs.rflags:08x} [{' '.join(decoded['rflags'])}]")
        for name in SEGMENT_NAMES:
            lines.append(f"  {name:>3}: {describe_segment(getattr(s, name))}")
        lines.append(f"  gdt base={s.gdt.base:#x} limit={s.gdt.limit:#x}  "
                     f"idt base={s.idt.base:#x} limit={s.idt.limit:#x}")
        for name in ("cr0", "cr4", "efer"):
            lines.append(f"  {name}={getattr(s, name):#x} [{' '.join(decoded[name])}]")
        lines.append(f"  cr2={s.cr2:#x} cr3={s.cr3:#x}")
        d = self.current.debugregs
        if d is not None:
            lines.append("  " + " ".join(f"dr{i}={a:#x}" for i, a in enumerate(d.db))
                         + f" dr6={d.dr6:#x} dr7={d.dr7:#x}")
        if self.changed:
            lines.append("  changed: " + ", ".join(
                f"{k} {a:#x}->{b:#x}" for k, (a, b) in self.changed.items()))
        return "\n".join(lines)
