"""Lockstep: one guest on two accelerators, one instruction at a time, until they disagree.

The differential tests compare where a guest ends; when two accelerators end differently,
the question is where they first parted. `lockstep` builds the same board twice (one per
accelerator, by default kvm and tcg), loads the same code, gives both vCPUs the same CPUID
table and CPU mode, then single-steps them side by side with `VcpuRunner.step`, which
already evens out what the accelerators do differently around an instruction (kvm_pvm
steps over a single-stepped HLT: the runner runs a HLT without single-step; tcg's IN has
completed by the time the step returns, as KVM's has). After every step it compares every
register `RegisterSnapshot.flat` names, the exit the step made (other than the
single-step's own `Debug`), and guest RAM. Two differences are in how each accelerator
steps, not in what the guest computes, and are evened out: a REP string instruction runs
one iteration per step on tcg (as the trap flag does on VMX and SVM) and whole on kvm_pvm
(KVM's emulator), so the side still at the instruction is stepped until it has finished
too, and the instruction is compared by registers and memory only (KVM batches its port
I/O, tcg exits per element); and RFLAGS.RF, which KVM's emulator leaves set after such a
step and which the guest cannot read (PUSHF clears it), is not compared. A third is evened
out in guest memory: on VMX and SVM KVM single-steps with the guest's own TF set, which a
PUSHF stores; lockstep clears it there, as the guest would have pushed it unstepped. A flag
the architecture leaves undefined after the instruction (SF, ZF, AF and PF after MUL; AF
after SHLD: Capstone's instruction tables say which) is no divergence, since each CPU may
set it its own way (one host's KVM agrees with tcg after a MUL, another's does not): the
report names the instruction and the flags, and the second vCPU goes on with the first
one's RFLAGS. Nothing else is masked.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field, replace

from ..accel import select
from ..kvm.exits import Debug, Hlt
from .assembler import assemble
from .boot import create_machine
from .cpu_modes import DEFAULT_LAYOUT, CpuMode
from .explain import decoder, disassemble
from .loaders import load_raw
from .dispatch import STOP
from .runloop import StepResult
from .snapshot import RegisterSnapshot
from ..x86 import (MAX_INSN, PAGE_SIZE, REP_PREFIXES, RFLAGS_BITS, RFLAGS_RF, RFLAGS_TF, code_bits,
                   opcode_offset)

# RFLAGS bits by name, and Capstone's "left undefined" bit for each.
_PUSHF = 0x9C
_FLAGS = {name: RFLAGS_BITS[name] for name in ("CF", "PF", "AF", "ZF", "SF", "OF")}
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
class UndefinedFlags:
    """An instruction after which the two vCPUs differ only in flags it leaves undefined."""
    step: int
    disassembly: str
    flags: tuple[str, ...]                     # the differing ones, e.g. ("SF", "PF")
    rflags: tuple[int, int]                    # RFLAGS on the first, on the second

    def __str__(self) -> str:
        a, b = self.rflags
        return (f"instruction {self.step}: {self.disassembly} leaves {', '.join(self.flags)} "
                f"undefined (RFLAGS {a:#x} and {b:#x})")


@dataclass
class LockstepReport:
    accels: tuple[str, str]
    steps: int                                 # instructions both executed
    stop: str                                  # why stepping ended
    divergence: Divergence | None
    final: tuple[RegisterSnapshot, RegisterSnapshot]
    undefined: list[UndefinedFlags] = field(default_factory=list)

    @property
    def agreed(self) -> bool:
        return self.divergence is None

    def __str__(self) -> str:
        a, b = self.accels
        notes = [f"  undefined flags differ after {u}" for u in self.undefined]
        if self.divergence is None:
            return "\n".join([f"{a} and {b} agree through {self.steps} instructions ({self.stop})",
                              *notes])
        d = self.divergence
        lines = [f"{a} and {b} diverge at instruction {d.step}: {d.disassembly}", *notes]
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
    code = assemble(source, bits=CpuMode(mode).bits, org=org).code
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
    undefined: list[UndefinedFlags] = []
    for step in range(1, max_steps + 1):
        code = _code(first, before)
        one, two = first.step(), second.step()
        exits = (_exit_key(one), _exit_key(two))
        if _is_rep(code, code_bits(before.sregs)):
            one, two = _finish_rep(first, one, max_steps), _finish_rep(second, two, max_steps)
            exits = ("REP", "REP")
        elif _is_pushf(code, code_bits(before.sregs)):
            for side, stepped in ((first, one), (second, two)):
                _clear_stepping_tf(side, stepped)
        registers = {name: values for name, values in one.after.diff(two.after).items()
                     if name != "rflags" or (values[0] ^ values[1]) & ~RFLAGS_RF}
        if "rflags" in registers:
            flags = undefined_flags_differing(registers["rflags"], code, code_bits(before.sregs))
            if flags:
                undefined.append(UndefinedFlags(step, _disassembly(code, before), flags,
                                                registers.pop("rflags")))
                two = replace(two, after=_adopt_rflags(second, two.after, one.after.regs.rflags))
        pages = _differing_pages(first.ram, second.ram)
        if registers or pages or exits[0] != exits[1]:
            divergence = Divergence(step, _disassembly(code, before), registers, exits, pages,
                                    before, (one.after, two.after))
            return LockstepReport(accels, step - 1, "diverged", divergence, (one.after, two.after),
                                  undefined)
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
    return LockstepReport(accels, step, stop, None, (before, RegisterSnapshot.capture(second.runner.vcpu)),
                          undefined)


def _disassembly(code: bytes, at: RegisterSnapshot) -> str:
    return disassemble(code, at.regs.rip, code_bits(at.sregs))


def undefined_flags_differing(rflags: tuple[int, int], code: bytes, bits: int) -> tuple[str, ...]:
    """The names of the flags two RFLAGS values differ in, if the instruction in `code`
    leaves every one of them undefined; () if any other bit (RF aside) differs."""
    differing = (rflags[0] ^ rflags[1]) & ~RFLAGS_RF
    undefined = undefined_flags(code, bits)
    mask = sum(1 << _FLAGS[name] for name in undefined)
    if differing & ~mask:
        return ()
    return tuple(name for name in undefined if differing & (1 << _FLAGS[name]))


def undefined_flags(code: bytes, bits: int) -> tuple[str, ...]:
    """The arithmetic flags the first instruction of `code` leaves undefined, by Capstone's
    instruction tables (e.g. ("AF", "PF", "SF", "ZF") for MUL)."""
    from capstone import x86
    insn = next(decoder(bits, detail=True).disasm(code, 0, 1), None)
    if insn is None:
        return ()
    return tuple(name for name in sorted(_FLAGS)
                 if insn.eflags & getattr(x86, f"X86_EFLAGS_UNDEFINED_{name}"))


def _adopt_rflags(side: _Side, after: RegisterSnapshot, rflags: int) -> RegisterSnapshot:
    """Give `side`'s vCPU the other one's RFLAGS, so that undefined flags set differently
    do not show up again as a difference at every later instruction."""
    regs = replace(after.regs, rflags=rflags)
    side.runner.vcpu.set_regs(regs)
    return replace(after, regs=regs)


def _exit_key(step: StepResult) -> str:
    """What a step's exit says about the guest. A `Debug` exit is the stepping itself: its
    DR6/DR7 are the debugger's (kvm_pvm reports DR7 0, tcg 0x400), its pc is RIP."""
    return "single-step" if step.exit.__class__ is Debug else step.exit.describe()


def _code(side: _Side, at: RegisterSnapshot) -> bytes:
    """The bytes at RIP (identity-mapped guests: the linear address is the physical one)."""
    linear = at.regs.rip if code_bits(at.sregs) == 64 else (at.sregs.cs.base + at.regs.rip) & 0xFFFFFFFF
    return side.machine.read_physical(linear, MAX_INSN)


def _is_rep(code: bytes, bits: int) -> bool:
    """A REP/REPE/REPNE prefix among the instruction's prefixes."""
    return not REP_PREFIXES.isdisjoint(code[:opcode_offset(code, bits == 64)])


def _is_pushf(code: bytes, bits: int) -> bool:
    offset = opcode_offset(code, bits == 64)
    return offset is not None and code[offset] == _PUSHF


def _clear_stepping_tf(side: _Side, step: StepResult) -> None:
    """KVM single-steps a VMX or SVM guest by setting the guest's own RFLAGS.TF (userspace
    reads it clear), so a stepped PUSHF stores TF set. Where the guest's flags had it clear,
    clear it in the pushed image (TF is bit 0 of its second byte), as without a debugger."""
    if step.before.regs.rflags & RFLAGS_TF:
        return
    at = step.after.sregs.ss.base + step.after.regs.rsp + 1
    high = side.machine.read_physical(at, 1)[0]
    if high & RFLAGS_TF >> 8:
        side.machine.memory.write(at, bytes([high & ~(RFLAGS_TF >> 8)]))


def _finish_rep(side: _Side, step: StepResult, limit: int) -> StepResult:
    """Step a vCPU that is still at its REP instruction until it has left it."""
    start = step.before.regs.rip
    for _ in range(limit):
        if step.after.regs.rip != start or (step.outcome.action is STOP
                                            and step.exit.__class__ is not Debug):
            break
        step = side.step()
    return step


def _differing_pages(a, b) -> list[int]:
    """Pages of two equally laid out RAM regions whose contents differ (memcmp first: it
    is one call when, as after nearly every step, they are the same)."""
    if _memcmp(a.host_address, b.host_address, a.size) == 0:
        return []
    return [a.gpa + offset for offset in range(0, a.size, PAGE_SIZE)
            if _memcmp(a.host_address + offset, b.host_address + offset, PAGE_SIZE) != 0]


__all__ = ["lockstep", "LockstepReport", "Divergence", "UndefinedFlags", "undefined_flags",
           "undefined_flags_differing"]
