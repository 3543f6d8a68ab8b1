"""Run a guest program from a file, start to finish: what `vlab run FILE` does.

The steps are those of the lab, without the stops in between: open an accelerator, build
the board (RAM, the standard devices, one vCPU with the accelerator's CPUID table, since
long mode needs the LM bit in it), load the file (`.asm` through nasm, `.elf` at its
physical addresses, anything else as raw bytes at `org`), put the vCPU in the CPU mode, run
until the guest halts or fails, and stream what it prints as it prints it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..accel import select
from .assembler import AssemblyError, assemble
from .board import Machine
from .builder import build_board
from .cpu_modes import DEFAULT_LAYOUT, CpuMode
from .exitlog import ExitLog
from .loaders import LoadedImage, load_elf, load_raw, parse_elf
from ..kvm.kernel_trace import KERNEL_TRACE_NEEDS_KVM
from .runloop import RunResult, VcpuRunner

# What `boot` may raise for a guest that cannot be run (the file, the assembler, the image,
# the memory size or KVM itself), so a command line can report it in one line.
BOOT_ERRORS = (OSError, ValueError, AssemblyError)


def create_machine(accel, *, memory: int | str = "16M",
                   cpu_model: Callable[[list], list] | None = None
                   ) -> tuple[Machine, VcpuRunner]:
    """A board on `accel` (an accelerator object) with RAM, the standard devices and vCPU 0;
    `cpu_model` turns the accelerator's supported CPUID table into the vCPU's (-cpu)."""
    cpuid = cpu_model(accel.get_supported_cpuid()) if cpu_model is not None else None
    machine = build_board(accel, memory=memory, cpuid=cpuid)
    return machine, machine.runners[0]


def guest_mode(path: str | os.PathLike, mode: CpuMode | str | None) -> CpuMode:
    """The CPU mode to start in: the one asked for, else what the program says of itself
    (an ELF's class, a `bits 32` or `bits 64` line: protected or long mode), else real mode."""
    if mode is not None:
        return CpuMode(mode)
    suffix = Path(path).suffix.lower()
    if suffix == ".elf":
        bits = 64 if parse_elf(path).elf_class == 64 else 32
    elif suffix == ".asm":
        bits = assemble(Path(path).read_text()).bits
    else:
        bits = 16
    return {16: CpuMode.REAL, 32: CpuMode.PROTECTED, 64: CpuMode.LONG}[bits]


def load_guest(machine: Machine, path: str | os.PathLike, mode: CpuMode | str,
               org: int | None = None) -> LoadedImage:
    """Put the program in `path` into guest memory; the image's entry is where it starts.

    `.asm` is assembled for the mode's code size at `org` (an `org` or `bits` line in the
    source wins); `.elf` goes where its program headers say; anything else is raw code
    loaded, and started, at `org`. `org` defaults to the boot layout's code address.
    """
    path = Path(path)
    org = DEFAULT_LAYOUT.code if org is None else org
    suffix = path.suffix.lower()
    if suffix == ".asm":
        assembly = assemble(path.read_text(), bits=CpuMode(mode).bits, org=org)
        return load_raw(machine.memory, assembly.org, assembly.code)
    if suffix == ".elf":
        return load_elf(machine.memory, path)
    return load_raw(machine.memory, org, path.read_bytes())


@dataclass
class BootResult:
    """How the guest ended, what it printed, and every exit on the way."""
    result: RunResult
    log: ExitLog
    output: bytes
    accel: str
    mode: CpuMode
    exit_status: int | None      # what the guest wrote to isa-debug-exit, as QEMU reports it
    kernel_totals: dict[str, int]

    @property
    def exit_code(self) -> int:
        """A process status, as QEMU gives: isa-debug-exit's status (its low 8 bits), 0 for
        a guest that halted, 1 for any other end (a fault, a timeout, Ctrl-C)."""
        if self.exit_status is not None:
            return self.exit_status & 0xFF
        return 0 if self.result.stop_reason.startswith("HLT") else 1

    def summary(self) -> str:
        """The stop reason (with its explanation), the exit histogram and KVM's counters."""
        lines = [f"--- {self.accel}, {self.mode.value} mode, {self.result}", str(self.log)]
        moved = {name: value for name, value in self.kernel_totals.items() if value}
        if moved:
            lines.append("in-kernel counters over the run: "
                         + ", ".join(f"{name}={value}" for name, value in moved.items()))
        return "\n".join(lines)


def boot(path: str | os.PathLike, *, mode: CpuMode | str | None = None, org: int | None = None,
         accel: str = "auto", memory: int | str = "16M", timeout: float | None = None,
         output: Callable[[bytes], None] | None = None,
         cpu_model: Callable[[list], list] | None = None, kernel_trace=None) -> BootResult:
    """Build a machine on `accel` ("kvm", "tcg" or "auto"), load the guest in `path`, set
    up `mode`, and run it until it halts, fails, asks to exit, or `timeout` seconds pass.
    `output(bytes)` is called with console output (serial and debug console) as it comes;
    `cpu_model` is `create_machine`'s; `kernel_trace` (a vlab.kvm.KernelTrace, kvm only)
    gives each exit record the kernel's events of its KVM_RUN.
    """
    mode = guest_mode(path, mode)
    accelerator = select(accel)
    if kernel_trace is not None and not accelerator.capabilities.kernel:
        accelerator.close()
        raise ValueError(f"{KERNEL_TRACE_NEEDS_KVM} ({accelerator.reason})")
    try:
        machine, runner = create_machine(accelerator, memory=memory, cpu_model=cpu_model)
        try:
            if output is not None:
                machine.console.listeners.append(output)
            image = load_guest(machine, path, mode, org)
            machine.setup_cpu(runner.vcpu, mode, image.entry)
            runner.kernel_trace = kernel_trace
            result = runner.run(timeout=timeout)
            request = machine.exit_request
            return BootResult(result, machine.log, machine.console.data, accelerator.name, mode,
                              request.status if request else None, machine.log.kernel_totals())
        finally:
            machine.close()
    finally:
        accelerator.close()


__all__ = ["boot", "BootResult", "BOOT_ERRORS", "create_machine", "load_guest", "guest_mode"]
