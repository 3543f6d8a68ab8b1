"""The board `vlab run` builds (RAM, standard devices, one vCPU), with a guest given as nasm
source: what the machine and run-loop tests start from, on KVM (`board`) or tcg (`tcg_board`)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from vlab.accel import select
from vlab.machine.assembler import Assembly, assemble
from vlab.machine.board import Machine
from vlab.machine.boot import create_machine
from vlab.machine.cpu_modes import CpuMode
from vlab.machine.loaders import load_raw
from vlab.machine.runloop import VcpuRunner

ORG = 0x8000
WATCHDOG = 30  # seconds: a run loop that fails to stop its guest fails the test, not hangs it

# Guests that print, for the run loops' differential tests: 40 bytes to the debug console; a
# line to the 16550, polling its LSR before each byte.
DEBUGCON = """
    mov cx, 40
    mov al, 'a'
again:
    out 0xe9, al
    inc al
    loop again
    hlt
"""

SERIAL = """
COM1 equ 0x3f8
    mov si, message
    xor bx, bx
    xor ax, ax
next:
    lodsb
    test al, al
    jz done
    mov ah, al
poll:
    mov dx, COM1 + 5            ; LSR
    in al, dx
    add bx, ax                  ; what LSR read, summed (compared between the loops)
    test al, 0x20               ; THRE
    jz poll
    mov al, ah
    mov dx, COM1                ; THR
    out dx, al
    jmp next
done:
    hlt
message: db "Hi, serial!", 13, 10, 0
"""


@dataclass
class Board:
    machine: Machine
    runner: VcpuRunner
    assembly: Assembly

    @property
    def vcpu(self):
        return self.runner.vcpu

    def address(self, marker: str) -> int:
        """Guest address of the first instruction from the source line containing `marker`
        on (a label's line holds none)."""
        lines = self.assembly.source.splitlines()
        line = next(i for i, text in enumerate(lines, 1) if marker in text)
        return min(address for address, number in self.assembly.lines.items() if number >= line)


def _watchdog(signum, frame):
    pytest.fail(f"the guest still ran after {WATCHDOG} s: nothing stopped it")


def _boards(accel: str):
    """`make(source, mode="real", org=ORG)` boards on `accel`, closed when the generator ends,
    under a watchdog."""
    machines: list[Machine] = []
    previous = signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG)

    def make(source: str, mode: CpuMode | str = "real", org: int = ORG) -> Board:
        machine, runner = create_machine(select(accel))
        machines.append(machine)
        assembly = assemble(source, bits=CpuMode(mode).bits, org=org)
        load_raw(machine.memory, assembly.org, assembly.code)
        machine.setup_cpu(runner.vcpu, mode, assembly.org)
        return Board(machine, runner, assembly)

    yield make
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    for machine in machines:
        machine.close()
        machine.accel.close()


@pytest.fixture
def board(kvm):
    """`board(source, mode="real", org=ORG)`: a KVM machine about to run `source`."""
    yield from _boards("kvm")


@pytest.fixture
def tcg_board():
    """`tcg_board(source, mode="real", org=ORG)`: the same machine on the software accelerator."""
    yield from _boards("tcg")
