"""The checks' own VM: RAM, one vCPU, a guest run to its end, with a time and exit bound.

Where the student writes only part of a VMM (special registers, a CPUID table, a device),
the check provides the rest here, the way vlab's machine does, on `select("auto")`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..accel import select
from ..kvm.exits import Exit, Hlt, Interrupted, IoIn, IoOut, MmioRead, MmioWrite
from ..machine.cpu_modes import initial_regs, setup_mode
from ..machine.memory import GuestMemory

RAM_SIZE = 4 << 20
CODE_GPA = 0x8000
STACK_TOP = 0x8000
RUN_SECONDS = 10.0
MAX_EXITS = 1000


@dataclass
class Outcome:
    """How a guest run ended: every exit, what went out on each port, and the last exit."""
    exits: list[Exit] = field(default_factory=list)
    output: dict[int, bytes] = field(default_factory=dict)

    @property
    def last(self) -> Exit | None:
        return self.exits[-1] if self.exits else None

    @property
    def halted(self) -> bool:
        return self.last.__class__ is Hlt


class GuestVm:
    """A VM with `ram_size` bytes of RAM at 0 and vCPU 0, its CPUID table set."""

    def __init__(self, cpuid=None, ram_size: int = RAM_SIZE):
        self.accel = select("auto")
        self.backend = self.accel.backend
        self.vm = self.accel.create_vm()
        self.memory = GuestMemory()
        self.vm.map_memory(self.memory.add_ram(0, ram_size))
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(self.accel.get_supported_cpuid() if cpuid is None else cpuid)

    def run(self, in_value: int = 0) -> Outcome:
        """Run until anything but port I/O or MMIO (answered: IN and MMIO reads with
        `in_value`'s bytes), at most MAX_EXITS exits and RUN_SECONDS seconds."""
        outcome = Outcome()
        timer = threading.Timer(RUN_SECONDS, self.vcpu.kick, (threading.get_ident(),))
        timer.start()
        try:
            while len(outcome.exits) < MAX_EXITS:
                exit = self.vcpu.run()
                outcome.exits.append(exit)
                cls = exit.__class__
                if cls is IoOut:
                    outcome.output[exit.port] = outcome.output.get(exit.port, b"") + exit.data
                elif cls is IoIn:
                    value = in_value.to_bytes(8, "little")[:exit.size]
                    self.vcpu.complete_io_in(exit, value * exit.count)
                elif cls is MmioRead:
                    self.vcpu.complete_mmio_read(exit, in_value.to_bytes(8, "little")[:exit.length])
                elif cls is not MmioWrite:
                    break
        finally:
            timer.cancel()
        return outcome

    def start_real_mode(self, code: bytes, entry: int = CODE_GPA) -> None:
        """`code` at `entry`, the vCPU there in real mode (segment bases 0)."""
        self.memory.write(entry, code)
        self.vcpu.set_sregs(setup_mode("real", self.vcpu.get_sregs(), self.memory,
                                       ram_size=self.memory.regions[0].size).sregs)
        self.vcpu.set_regs(initial_regs("real", entry, STACK_TOP))

    def read_physical(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
        self.accel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_end(outcome: Outcome) -> str:
    """The end of a run in a few words: the last exit, or why there was none."""
    last = outcome.last
    if last is None:
        return "no exit at all"
    if last.__class__ is Interrupted:
        return f"no end within {RUN_SECONDS:.0f} s (stopped)"
    if len(outcome.exits) >= MAX_EXITS:
        return f"{MAX_EXITS} exits without an end, the last {last.describe()}"
    return f"KVM_EXIT_{last.name}"


__all__ = ["GuestVm", "Outcome", "describe_end", "RAM_SIZE", "CODE_GPA", "STACK_TOP"]
