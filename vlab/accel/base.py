"""What the machine needs from an accelerator, QEMU's `-accel`: the same VM and vCPU surface
whether KVM runs the guest or Unicorn emulates it.

The vCPU surface is `vlab.kvm.VcpuFd`'s: `run()` returns the exit types of `vlab.kvm.exits`,
registers are `vlab.kvm.state` values, and IN / MMIO-read / RDMSR exits are answered with
`complete_*` before the next `run()`. A software accelerator honours the same contract, so
the machine, the lab and the widgets never ask which one is underneath.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..kvm.backend import Backend
    from ..kvm.exits import Exit, IoIn, MmioRead, X86Rdmsr
    from ..kvm.state import CpuidEntry, DebugRegs, Regs, Sregs


class StatsSource(Protocol):
    """In-kernel (or in-emulator) counters: `vlab.kvm.StatsFd`'s reading surface."""
    def names(self) -> list[str]: ...
    def read(self) -> dict: ...
    def read_raw(self) -> tuple[int, ...]: ...
    def selector(self, names) -> tuple[tuple[str, ...], object]:
        """(names, reader): a cheap reader of just those counters, for the exit path."""
    def delta(self, before: tuple[int, ...], after: tuple[int, ...]) -> dict[str, int]: ...
    def close(self) -> None: ...


class AccelVcpu(Protocol):
    id: int

    def run(self) -> "Exit": ...
    def enable_sync_regs(self, mask: int) -> None:
        """Keep `synced_rip` current on every exit (KVM_CAP_SYNC_REGS)."""
    @property
    def synced_rip(self) -> int:
        """RIP at the last exit, read without an extra ioctl."""
    def get_regs(self) -> "Regs": ...
    def set_regs(self, regs: "Regs") -> None: ...
    def get_sregs(self) -> "Sregs": ...
    def set_sregs(self, sregs: "Sregs") -> None: ...
    def get_debugregs(self) -> "DebugRegs": ...
    def complete_io_in(self, exit: "IoIn", data: bytes) -> None: ...
    def complete_mmio_read(self, exit: "MmioRead", data: bytes) -> None: ...
    def complete_rdmsr(self, exit: "X86Rdmsr", value: int = 0, error: bool = False) -> None: ...
    def set_guest_debug(self, enable: bool = True, single_step: bool = False,
                        hw_breakpoints: tuple[int, ...] = ()) -> None: ...
    def set_cpuid2(self, entries: "list[CpuidEntry]") -> None: ...
    def get_cpuid2(self) -> "list[CpuidEntry]": ...
    def get_msrs(self, indices: list[int]) -> dict[int, int]: ...
    def set_msrs(self, values: dict[int, int]) -> int: ...
    def kick(self, thread_ident: int | None = None) -> None:
        """Make a `run()` in progress (or the next one) return `Interrupted` promptly;
        callable from any thread."""
    def get_stats_fd(self) -> StatsSource: ...
    def close(self) -> None: ...


class AccelVm(Protocol):
    # Capability: guest-physical addresses of the pages of a region written since the last
    # call (KVM's dirty log), or None where the accelerator keeps no such log.
    dirty_pages: "Callable[[object], list[int]] | None"

    def map_memory(self, region) -> None:
        """Back a `vlab.machine.memory.Region` (RAM, or ROM read-only) with guest memory."""
    def create_vcpu(self, vcpu_id: int = 0) -> AccelVcpu: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Capabilities:
    """What an accelerator offers beyond the surface every one has. The machine and the lab
    ask these, never an accelerator's name or type."""
    kernel: bool          # a real /dev/kvm: fds, kvm_run, the TSC and feature-MSR ioctls
    dirty_log: bool       # memory slots can log the pages the guest writes
    irqchip: bool         # in-kernel PIC, IOAPIC, local APICs and PIT
    inline_port_io: bool  # IN/OUT reach the devices on the vCPU thread, without an exit
    # What a vCPU's saved state holds besides registers and MSRs: the `get_NAME`/`set_NAME`
    # pairs of "fpu", "xcrs", "vcpu_events", "mp_state", "debugregs" it offers.
    vcpu_state: tuple[str, ...] = ()


class Accelerator(Protocol):
    name: str            # "kvm" or "tcg"
    reason: str          # why this accelerator was chosen (shown by `auto`)
    backend: "Backend"   # what runs the guest, and the facts of it (vlab.kvm.backend)
    capabilities: Capabilities

    def stage_actions(self, stage: str, **facts) -> list[str]:
        """What this accelerator did for a stage of QEMU's bring-up beyond the ioctls its
        record lists (on tcg: what it does in their place); `facts` fill in the numbers."""
    def create_vm(self) -> AccelVm: ...
    def get_supported_cpuid(self) -> "list[CpuidEntry]": ...
    def close(self) -> None: ...
