"""One self-checking example guest per CPU mode, after dpw/kvm-hello-world.

Each guest expects the mode already set up by `setup_mode` (the VMM's job, as in
kvm-hello-world), checks from inside that it really runs in that mode, prints
"Hello from <mode> mode\\n" one byte at a time on the debug console port 0xE9, stores the
32-bit value 42 at guest-physical `RESULT_GPA` and leaves it in EAX/RAX, then halts.
So every run is a test: output, memory and registers are all known in advance, on KVM
and on the software accelerator alike. A guest that finds itself in the wrong mode says
so and stores 0xBAD instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from vlab.machine.cpu_modes import DEFAULT_LAYOUT, CpuMode

RESULT_GPA = 0x400     # just above the real-mode interrupt vector table, below the GDT
DEBUG_CONSOLE_PORT = 0xE9
RESULT = 42


@dataclass(frozen=True)
class ExampleGuest:
    name: str
    mode: CpuMode
    source_path: str            # relative to the vlab.machine package
    org: int                    # load address, the source's `org`
    expected_output: bytes      # bytes written to DEBUG_CONSOLE_PORT
    expected_memory: dict[int, bytes]
    expected_regs: dict[str, int]

    def source(self) -> str:
        """The shipped nasm source."""
        return resources.files("vlab.machine").joinpath(self.source_path).read_text()


def _example(mode: CpuMode) -> ExampleGuest:
    return ExampleGuest(
        name=mode.value, mode=mode, source_path=f"guests/{mode.value}.asm",
        org=DEFAULT_LAYOUT.code,
        expected_output=f"Hello from {mode.value} mode\n".encode(),
        expected_memory={RESULT_GPA: RESULT.to_bytes(4, "little")},
        expected_regs={"rax": RESULT})


EXAMPLES: dict[str, ExampleGuest] = {mode.value: _example(mode) for mode in CpuMode}

__all__ = ["ExampleGuest", "EXAMPLES", "RESULT_GPA", "DEBUG_CONSOLE_PORT", "RESULT"]
