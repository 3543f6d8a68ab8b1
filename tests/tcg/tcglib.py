"""Guests for the tcg tests: assembled with nasm, loaded into `GuestMemory`, run in the CPU
mode `setup_mode` prepares, as the machine will do: on a `TcgVcpu`, or on any accelerator
(the differential tests give the same guest to KVM)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlab.accel.tcg import TcgAccelerator, TcgVcpu, TcgVm
from vlab.kvm.exits import Exit, IoOut
from vlab.machine.assembler import Assembly, assemble
from vlab.machine.cpu_modes import DEFAULT_LAYOUT, CpuMode, initial_regs, setup_mode
from vlab.machine.memory import GuestMemory

RAM_SIZE = 0x200000
ORG = DEFAULT_LAYOUT.code
MAX_EXITS = 10_000  # a guest that never reaches the awaited exit fails instead of hanging


@dataclass
class Guest:
    accelerator: object
    memory: GuestMemory
    vm: TcgVm
    vcpu: TcgVcpu
    assembly: Assembly
    exits: list[Exit] = field(default_factory=list)

    def address_of(self, label: str) -> int:
        """The guest address of the statement on the source line ending with `; <label>`."""
        lines = self.assembly.source.splitlines()
        line = next(i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"; {label}"))
        return next(address for address, n in self.assembly.lines.items() if n == line)

    def run(self) -> Exit:
        self.exits.append(self.vcpu.run())
        return self.exits[-1]

    def run_until(self, kind: type[Exit], limit: int = MAX_EXITS) -> list[Exit]:
        """Run until an exit of `kind`; every exit on the way, that one last."""
        start = len(self.exits)
        for _ in range(limit):
            if isinstance(self.run(), kind):
                return self.exits[start:]
        raise AssertionError(f"no {kind.__name__} exit in {limit} exits; last: {self.exits[-5:]}")

    def output(self, port: int = 0xE9) -> bytes:
        return b"".join(e.data for e in self.exits if isinstance(e, IoOut) and e.port == port)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
        self.accelerator.close()


def make_guest(source: str, mode: CpuMode | str = CpuMode.REAL, *, cpuid=None,
               rom: tuple[int, bytes] | None = None, accelerator=None) -> Guest:
    """A VM with RAM at 0, an optional ROM, `source` assembled at ORG and one vCPU about to
    run it in `mode`, with the accelerator's CPUID table unless `cpuid` is given. The
    accelerator (default: a new `TcgAccelerator`) is closed with the guest."""
    mode = CpuMode(mode)
    accelerator = accelerator or TcgAccelerator()
    memory = GuestMemory()
    vm = accelerator.create_vm()
    regions = [memory.add_ram(0, RAM_SIZE)]
    if rom is not None:
        regions.append(memory.add_rom(rom[0], rom[1]))
    for region in regions:
        vm.map_memory(region)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(accelerator.get_supported_cpuid() if cpuid is None else cpuid)
    setup = setup_mode(mode, vcpu.get_sregs(), memory, ram_size=RAM_SIZE)
    assembly = assemble(source, bits=CpuMode(mode).bits, org=ORG)
    memory.write(ORG, assembly.code)
    vcpu.set_sregs(setup.sregs)
    vcpu.set_regs(initial_regs(mode, ORG, DEFAULT_LAYOUT.stack_top))
    return Guest(accelerator, memory, vm, vcpu, assembly)
