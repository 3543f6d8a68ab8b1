"""QEMU's `isa-debug-exit`: a port whose write ends the VM with a status the guest chose.

hw/misc/debugexit.c calls `exit((val << 1) | 1)` for a write of `val`, so a test guest can
report pass/fail as QEMU's exit status. The status is always odd, so a guest can never
fake QEMU's clean exit 0; `v = 0` gives 1, QEMU's own failure code. Test suites such as
kvm-unit-tests map the device with `-device isa-debug-exit,iobase=0xf4,iosize=0x4`, the
placement used here (QEMU's property defaults are iobase 0x501, iosize 2). Here the device
only records the request and tells the injected `on_exit`; stopping the vCPU is the run
loop's business. A process exit code keeps only the low 8 bits of the status;
`exit_status` keeps it whole.
"""
from __future__ import annotations

from typing import Callable


class IsaDebugExit:
    """`isa-debug-exit`: writing `v` (1, 2 or 4 bytes) requests exit status `(v << 1) | 1`."""

    IOBASE = 0xF4
    SIZE = 4

    def __init__(self, on_exit: Callable[[int], None] | None = None,
                 name: str = "debug-exit") -> None:
        self.name = name
        self.exit_status: int | None = None
        self._on_exit = on_exit

    def read(self, offset: int, size: int = 1) -> int:
        return 0

    def write(self, offset: int, value: int, size: int = 1) -> None:
        self.exit_status = ((value & ((1 << (8 * size)) - 1)) << 1) | 1
        if self._on_exit is not None:
            self._on_exit(self.exit_status)

    def state(self) -> dict:
        return {"exit_status": self.exit_status}
