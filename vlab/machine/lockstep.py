"""Lockstep: one guest on two accelerators, one instruction at a time, until they disagree.

The differential tests compare where a guest ends; when two accelerators end differently,
the question is where they first parted. `lockstep` builds the same board twice (one per
accelerator, by default kvm and tcg), loads the same code, gives both vCPUs the same CPUID
table and CPU mode, then single-steps them side by side with `VcpuRunner.step`, which
already evens out what the accelerators do differently around an instruction (this host's
KVM steps over HLT: the runner runs a HLT without single-step; tcg's IN has completed by
the time the step returns, as KVM's has). After every step it compares every register
`RegisterSnapshot.flat` names, the exit the step made (other than the single-step's own
`Debug`), and guest RAM. No register or flag is masked:
a flag the architecture leaves undefined (AF after SHLD) shows up as a divergence, since
it is one.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ..accel import select
from ..kvm.exits import Debug, Hlt
from .assembler import assemble
from .boot import MODE_BITS, create_machine
from .cpu_modes import DEFAULT_LAYOUT, CpuMode
from .explain import MAX_INSN, cpu_bits, disassemble
from .loaders import load_raw
from .runloop import STOP, StepResult
from .snapshot import RegisterSnapshot

PAGE = 0x1000
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rip", "rflags")


@dataclass
class Divergence:
    """The first instruction after which the two vCPUs differ."""
    step: int                                  # 1 for the first instruction
    disassembly: str                           # the instruction, at its linear address
    registers: dict[str, tuple[int, int]]      # name -> (value on the first, on the second)
    exits: tuple[str, str]                     # what the step made each accelerator exit with
    pages: list[int]                           # guest-physical pages whose contents differ
    before: RegisterSnapshot                   # both agreed on this
    after: tuple[RegisterSnapshot, RegisterSnapshot]


@dataclass
class LockstepReport:
    accels: tuple[str, str]
    steps: int                                 # instructions both executed
    stop: str                                  # why stepping ended
    divergence: Divergence | None
    final: tuple[RegisterSnapshot, RegisterSnapshot]

    @property
    def agreed(self) -> bool:
        return self.divergence is None

    def __str__(self) -> str:
        a, b = self.accels
        if self.divergence is None:
            return f"{a} and {b} agree through {self.steps} instructions ({self.stop})"
        d = self.divergence
        lines = [f"{a} and {b} diverge at instruction {d.step}: {d.disassembly}"]
        if d.exits[0] != d.exits[1]:
            lines.append(f"  exit: {a} {d.exits[0]}; {b} {d.exits[1]}")
        if d.registers:
            lines.append("  differing: " + ", ".join(d.registers))
        if d.pages:
            lines.append("  memory differs in the pages at " + ", ".join(f"{p:#x}" for p in d.pages))
        first, second = (s.flat() for s in d.after)
        shown = [*_GPRS, *(n for n in d.registers if n not in _GPRS)]
        lines.append(f"  {'register':<10} {a:>18} {b:>18}")
        lines += [f"  {n:<10} {first[n]:>#18x} {second[n]:>#18x}" + ("  *" if n in d.registers else "")
                  for n in shown]
        return "\n".join(lines)


class _Side:
    """One accelerator's board with the guest loaded and its vCPU set up."""

    def __init__(self, accel_name: str, code: bytes, mode: CpuMode, org: int, memory):
        self.accel = select(accel_name)
        try:
            self.machine, self.runner = create_machine(self.accel, memory=memory)
            load_raw(self.machine.memory, org, code)
            self.machine.setup_cpu(self.runner.vcpu, mode, org, stack=DEFAULT_LAYOUT.stack_top)
        except BaseException:
            self.accel.close()
            raise
        self.ram = next(r for r in self.machine.memory.regions if r.slot is not None)

    def step(self) -> StepResult:
        return self.runner.step()

    def close(self) -> None:
        self.machine.close()
        self.accel.close()


def lockstep(source: str, mode: CpuMode | str = CpuMode.REAL, *, accels=("kvm", "tcg"),
             cpuid=None, max_steps: int = 10_000, memory: int | str = "2M",
             org: int = DEFAULT_LAYOUT.code) -> LockstepReport:
    """Single-step the assembly `source` (nasm, loaded and entered at `org`, in `mode`) on
    both `accels` until the vCPUs differ, both halt, one stops for good, or `max_steps`.
    Both get the CPUID table `cpuid`, by default the first accelerator's supported one."""
    mode = CpuMode(mode)
    code = assemble(source, bits=MODE_BITS[mode], org=org).code
    sides: list[_Side] = []
    try:
        for name in accels:
            sides.append(_Side(name, code, mode, org, memory))
        first, second = sides
        table = first.accel.get_supported_cpuid() if cpuid is None else cpuid
        for side in sides:
            side.runner.vcpu.set_cpuid2(table)
        return _compare(first, second, max_steps)
    finally:
        for side in sides:
            side.close()


def _compare(first: _Side, second: _Side, max_steps: int) -> LockstepReport:
    accels = (first.accel.name, second.accel.name)
    before = RegisterSnapshot.capture(first.runner.vcpu)
    differing = before.diff(RegisterSnapshot.capture(second.runner.vcpu))
    if differing:
        raise RuntimeError(f"the two vCPUs differ before the first instruction: {differing}")
    stop = f"{max_steps} steps"
    for step in range(1, max_steps + 1):
        one, two = first.step(), second.step()
        exits = (_exit_key(one), _exit_key(two))
        registers = one.after.diff(two.after)
        pages = _differing_pages(first.ram, second.ram)
        if registers or pages or exits[0] != exits[1]:
            divergence = Divergence(step, _disassemble(first, before), registers, exits, pages,
                                    before, (one.after, two.after))
            return LockstepReport(accels, step - 1, "diverged", divergence, (one.after, two.after))
        before = one.after
        request = first.machine.exit_request
        if one.exit.__class__ is Hlt:
            stop = f"both halted at {before.regs.rip - 1:#x}"
        elif request is not None:
            stop = f"the guest asked to exit with status {request.status} (isa-debug-exit)"
        elif one.outcome.action is STOP and one.exit.__class__ is not Debug:
            stop = f"both stopped: {one.outcome.stop_reason}"
        else:
            continue
        break
    return LockstepReport(accels, step, stop, None, (before, RegisterSnapshot.capture(second.runner.vcpu)))


def _exit_key(step: StepResult) -> str:
    """What a step's exit says about the guest. A `Debug` exit is the stepping itself: its
    DR6/DR7 are the debugger's (KVM here reports DR7 0, tcg 0x400), its pc is RIP."""
    return "single-step" if step.exit.__class__ is Debug else step.exit.describe()


def _disassemble(side: _Side, at: RegisterSnapshot) -> str:
    """The instruction at RIP in the CPU's current code size (identity-mapped guests)."""
    bits = cpu_bits(at.sregs)
    linear = at.regs.rip if bits == 64 else (at.sregs.cs.base + at.regs.rip) & 0xFFFFFFFF
    return disassemble(side.machine.read_physical(linear, MAX_INSN), at.regs.rip, bits)


def _differing_pages(a, b) -> list[int]:
    """Pages of two equally laid out RAM regions whose contents differ (memcmp first: it
    is one call when, as after nearly every step, they are the same)."""
    if _memcmp(a.host_address, b.host_address, a.size) == 0:
        return []
    return [a.gpa + offset for offset in range(0, a.size, PAGE)
            if _memcmp(a.host_address + offset, b.host_address + offset, PAGE) != 0]


__all__ = ["lockstep", "LockstepReport", "Divergence"]
