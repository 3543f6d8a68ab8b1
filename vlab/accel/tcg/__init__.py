"""The tcg accelerator: a software x86 CPU over Unicorn 2 (QEMU's TCG, as a library).

Where /dev/kvm cannot be used, QEMU falls back to TCG, its own translator; vlab does the
same with Unicorn, which is QEMU's TCG x86 CPU cut out as a library. The VM and vCPU have
KVM's surface, `run()` returns KVM's exit types one at a time, and registers, memory and
device output end up as on KVM (tests/tcg/test_tcg_differential.py). What differs:

- Port I/O can be handled inside emulation, as QEMU's TCG always does
  (`TcgVcpu.dispatch_port_io`; the run loop uses it): the device is called from the
  instruction and the guest runs on, where KVM must return to userspace for each access.
- IN: during an `IoIn` exit RIP is already past the IN and AL/AX/EAX holds 0 until
  `complete_io_in` (KVM: RIP still at the IN). `IoIn.data_offset` is 0 (there is no
  kvm_run). `rep ins`/`rep outs` exit once per element (`count` 1), where KVM batches.
- MMIO reads and writes, and stores to ROM, behave as on KVM, by restarting the
  instruction (`restart`); code cannot run from a hole: `InternalError`. An MMIO access
  that is not naturally aligned is split by Unicorn: a store exits a byte at a time, a
  load once per aligned word it touches (KVM: one exit with the access as the guest made it).
- Single-stepping `rep movs`/`stos`/`outs`... steps one iteration (as the trap flag does on
  VMX and SVM); kvm_pvm's emulator runs the whole instruction in one step.
- Exceptions are not delivered through a protected- or long-mode IDT: a vector the IDT
  does not cover is a triple fault (`Shutdown`, as on KVM); one it covers is
  `InternalError(DELIVERY_EV, data=(vector,))`. Real mode uses the IVT, as the CPU does.
  An undefined opcode (ud2) raises #UD, delivered the same way.
- MSRs are QEMU's: no `X86Rdmsr`/`X86Wrmsr` exits; an MSR QEMU lacks reads 0 and ignores
  writes in the guest (KVM: #GP), and stops `get_msrs`/`set_msrs` (`msrs`).
- CPUID answers every leaf from the table (kvm_pvm takes leaves 1 and 7 from the host), but
  a masked feature is only hidden: without LM the CPU still enters long mode.
- Single-stepping HLT gives `Hlt`, then `Debug` (VMX and SVM give `Hlt`; kvm_pvm steps over
  it: `Backend.single_step_reports_hlt`).
  Breakpoints set by the guest itself in DR0-DR7 are kept but not armed.
- `kick()` needs no signal; `time_limit` (seconds) makes `run()` return `Interrupted`;
  a signal reaches the main thread within a time slice (`watchdog`). A HLT finishing
  within microseconds of a kick or slice end can be reported as `Interrupted`, or run past.
- Stats are the vCPU's own counters (`stats`), not KVM's; no instruction count.
- There is no APIC, PIT or interrupt injection; CR8 and the APIC base are only stored.
- Undefined flags can differ from hardware (AF after SHLD). Code the host writes into
  guest memory is seen after `set_regs`/`set_sregs` (translations are dropped there).
"""
from __future__ import annotations

from ...kvm.backend import TCG
from ..base import Capabilities
from .cpuid import supported_cpuid
from .vcpu import TcgVcpu
from .vm import TcgVm


class TcgAccelerator:
    """QEMU's `tcg-accel`: nothing to open; each VM is a set of Unicorn engines."""

    name = "tcg"
    backend = TCG
    capabilities = Capabilities(kernel=False, dirty_log=False, irqchip=False, inline_port_io=True,
                                vcpu_state=("debugregs",))

    def __init__(self, reason: str = "asked for tcg"):
        self.reason = reason

    def stage_actions(self, stage: str, **facts) -> list[str]:
        """What the software accelerator does in place of the stage's KVM ioctls."""
        return [action.format(**facts) for action in IN_PLACE_OF.get(stage, ())]

    def create_vm(self) -> TcgVm:
        return TcgVm()

    def get_supported_cpuid(self):
        """The CPUID table of the emulated CPU, a "qemu64"-like model (see `cpuid`)."""
        return supported_cpuid()

    def close(self) -> None:
        """Nothing to release: VMs close their own engines."""


# Per stage of QEMU's bring-up, what tcg does where KVM has an ioctl.
IN_PLACE_OF = {
    "kvm_init": (
        "no /dev/kvm to open: Unicorn (QEMU's TCG role) will translate and run the guest's "
        "instructions in software",
        "uc_open(UC_ARCH_X86, UC_MODE_64) in place of KVM_CREATE_VM"),
    "x86_cpu_realizefn": (
        "the CPUID table comes from the software accelerator's own model (no "
        "KVM_GET_SUPPORTED_CPUID)",),
    "kvm_init_vcpu": (
        "vCPU {vcpu.id}: a Unicorn engine context in place of KVM_CREATE_VCPU; no kvm_run to map",),
    "kvm_arch_init_vcpu": (
        "CPUID table kept by the software vCPU: its CPUID instruction answers from it, every "
        "leaf",),
    "pc_memory_init": (
        "uc_mem_map_ptr() of the same host memory in place of KVM_SET_USER_MEMORY_REGION",),
    "kvm_arch_put_registers": (
        "uc_reg_write() of the segments, control registers, EFER, GDTR and IDTR in place of "
        "KVM_SET_SREGS, and of the general-purpose registers in place of KVM_SET_REGS; "
        "translated code flushed (uc_ctl_flush_tb)",),
    "kvm_cpu_exec": (
        "uc_emu_start() {emu_starts} times in place of KVM_RUN: Unicorn translated and ran the "
        "guest's code; port I/O reached the devices from inside the instruction's hook "
        "(QEMU's TCG: cpu_outb/cpu_inb), and only MMIO, a HLT or a stop condition stopped "
        "emulation (uc_emu_stop) to return an exit",),
}

__all__ = ["TcgAccelerator", "TcgVm", "TcgVcpu", "supported_cpuid"]
