"""The tcg vCPU's state calls, as KVM's get/set ioctls: registers through Unicorn's register
API, what that API cannot set through `cpustate`, MSRs as QEMU's TCG keeps them, and the
CPUID table its CPUID instruction reads."""
from __future__ import annotations

from unicorn import x86_const as x86

from ...kvm.abi import ffi
from ...kvm.convert import regs_to_c, sregs_to_c
from ...kvm.sregs_check import validate_set_sregs
from ...kvm.state import CpuidEntry, DebugRegs, GPR_NAMES, Regs, Sregs
from .cpuid import CpuidAnswers
from .cpustate import read_sregs, write_sregs
from .msrs import READABLE, WRITABLE

_GPRS = tuple(getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES)
_REGS = _GPRS + (x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS)
_DEBUG_REGS = tuple(getattr(x86, f"UC_X86_REG_DR{i}") for i in (0, 1, 2, 3, 6, 7))


class TcgVcpuState:
    """Part of `TcgVcpu`: its engine (`_engine`), restart log (`_log`), shadow special
    registers (`_shadow`), CPUID table (`_cpuid`) and decoded port I/O (`_io_shapes`)."""

    def get_regs(self) -> Regs:
        return Regs(*self._engine.read_many(_REGS))

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS. Moving RIP abandons an instruction waiting to restart. Translated code
        is dropped, since the host may have written new code into guest memory. Values
        kvm_regs cannot hold are refused, as the kvm accelerator refuses them."""
        regs_to_c(regs, ffi.new("struct kvm_regs *"))
        engine = self._engine
        if regs.rip != engine.rip():
            self._log.clear()
        for reg, name in zip(_GPRS, GPR_NAMES):
            engine.write(reg, getattr(regs, name))
        engine.write(x86.UC_X86_REG_RIP, regs.rip)
        engine.write(x86.UC_X86_REG_RFLAGS, regs.rflags)
        engine.flush_translations()
        self._forget_io_shapes()

    def get_sregs(self) -> Sregs:
        return read_sregs(self._engine.uc, self._shadow)

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS; CR8, the APIC base and the interrupt bitmap are kept but not
        emulated (Unicorn has no local APIC). What KVM_SET_SREGS would refuse (a value
        kvm_sregs cannot hold, or EINVAL: CR0.PG without PE, ...) is refused here too."""
        sregs_to_c(sregs, ffi.new("struct kvm_sregs *"))
        validate_set_sregs(sregs)
        write_sregs(self._engine.uc, sregs)
        self._shadow = sregs
        self._engine.flush_translations()
        self._forget_io_shapes()

    def get_debugregs(self) -> DebugRegs:
        """The guest's DR0-DR3, DR6, DR7 (not the breakpoints `set_guest_debug` sets, as
        KVM_GET_DEBUGREGS)."""
        *db, dr6, dr7 = (self._engine.uc.reg_read(reg) for reg in _DEBUG_REGS)
        return DebugRegs(tuple(db), dr6, dr7)

    def set_debugregs(self, debugregs: DebugRegs) -> None:
        """Stored for the guest to read back; Unicorn does not arm breakpoints set this way."""
        values = (*debugregs.db, debugregs.dr6, debugregs.dr7)
        for reg, value in zip(_DEBUG_REGS, values):
            self._engine.uc.reg_write(reg, value)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: values up to the first MSR the emulated CPU lacks (see `msrs`)."""
        out = {}
        for index in indices:
            if index not in READABLE:
                break
            out[index] = self._engine.uc.msr_read(index)
        return out

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were written; stops at the first it cannot write."""
        for done, (index, value) in enumerate(values.items()):
            if index not in WRITABLE:
                return done
            self._engine.uc.msr_write(index, value)
        return len(values)

    # --- CPUID ---------------------------------------------------------------------------------
    def set_cpuid2(self, entries) -> None:
        """The table the guest's CPUID instruction reads, every leaf (see `cpuid`)."""
        self._cpuid = CpuidAnswers(entries)

    def get_cpuid2(self) -> list[CpuidEntry]:
        return list(self._cpuid.entries)
