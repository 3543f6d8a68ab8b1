"""Small real-mode guests for the tests that need /dev/kvm: assemble, map, run.

A guest is one memory slot of anonymous memory at guest-physical 0, its code assembled by
nasm at `ORG`, and one vCPU in flat real mode (CS base 0) starting there: the shape of
kvm-hello-world's real-mode lesson, small enough that each test reads as its guest.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

from vlab.kvm import Exit, Kvm, Regs, VcpuFd, VmFd, host_address
from vlab.machine.assembler import Assembly, assemble

ORG = 0x1000
MEMORY_SIZE = 0x10000
MAX_EXITS = 10_000  # a guest that never reaches the awaited exit fails instead of hanging


def flat_real_mode(vcpu: VcpuFd, rip: int) -> None:
    """CS base 0 (the reset state has CS base 0xffff0000) and RIP at the code."""
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
    vcpu.set_regs(Regs(rip=rip, rflags=0x2))


@dataclass
class Guest:
    vm: VmFd
    vcpu: VcpuFd
    memory: mmap.mmap
    assembly: Assembly

    def run_until(self, kind: type[Exit], limit: int = MAX_EXITS) -> list[Exit]:
        """Run until an exit of `kind`; every exit on the way, that one last."""
        exits = []
        while len(exits) < limit:
            exits.append(self.vcpu.run())
            if isinstance(exits[-1], kind):
                return exits
        raise AssertionError(f"no {kind.__name__} exit in {limit} exits; last: {exits[-5:]}")

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


def real_mode_guest(kvm: Kvm, source: str, memory_size: int = MEMORY_SIZE,
                    slot_flags: int = 0) -> Guest:
    """A VM with `source` assembled at ORG and one vCPU about to execute it."""
    assembly = assemble(source, bits=16, org=ORG)
    memory = mmap.mmap(-1, memory_size)
    memory[ORG:ORG + len(assembly.code)] = assembly.code
    vm = kvm.create_vm()
    try:
        vm.set_user_memory_region(0, 0, memory_size, host_address(memory), slot_flags)
        flat_real_mode(vm.create_vcpu(0), ORG)
    except BaseException:
        vm.close()
        memory.close()
        raise
    return Guest(vm, vm.vcpus[0], memory, assembly)
