"""The vCPU's state ioctls: what QEMU's kvm_arch_put_registers / kvm_arch_get_registers move
between its CPUX86State and KVM (registers, FPU, events, MSRs, debug registers, CPUID, TSC)."""
from __future__ import annotations

import errno

from .abi import MpState, ffi
from .convert import (cpuid_entries_from_c, cpuid_to_c, flexible, from_python, regs_from_c,
                      regs_to_c, sregs_from_c, sregs_to_c, to_python)
from .errors import KvmError
from .fd import KvmFd
from .sregs_check import set_sregs_problems
from .state import DebugRegs, Regs, Sregs


class VcpuStateIoctls(KvmFd):
    """The get/set ioctls of a vCPU fd; `VcpuFd` adds KVM_RUN and its kvm_run mapping."""

    # --- registers ---------------------------------------------------------------------------
    def get_regs(self) -> Regs:
        """KVM_GET_REGS.

        >>> regs = Kvm().create_vm().create_vcpu(0).get_regs()   # x86's reset state
        >>> hex(regs.rip), hex(regs.rflags)   # (RDX holds the CPU's family and model)
        ('0xfff0', '0x2')
        """
        regs = ffi.new("struct kvm_regs *")
        self._ioctl("GET_REGS", regs)
        return regs_from_c(regs)

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_regs(Regs(rip=0x1000, rbx=42))
        >>> vcpu.get_regs().rbx
        42
        """
        c = ffi.new("struct kvm_regs *")
        regs_to_c(regs, c)
        self._ioctl("SET_REGS", c, f"rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x}")

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS: segments, descriptor tables, control registers, EFER.

        >>> sregs = Kvm().create_vm().create_vcpu(0).get_sregs()
        >>> hex(sregs.cs.selector), hex(sregs.cs.base), hex(sregs.cr0)   # x86's reset state
        ('0xf000', '0xffff0000', '0x60000010')
        """
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl("GET_SREGS", sregs)
        return sregs_from_c(sregs)

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> sregs = vcpu.get_sregs()
        >>> vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
        >>> vcpu.get_sregs().cs.base
        0
        """
        c = ffi.new("struct kvm_sregs *")
        sregs_to_c(sregs, c)
        try:
            self._ioctl("SET_SREGS", c, f"cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} "
                                        f"cr4={sregs.cr4:#x} efer={sregs.efer:#x} "
                                        f"cs={sregs.cs.selector:#x}")
        except KvmError as e:
            problems = set_sregs_problems(sregs) if e.errno == errno.EINVAL else []
            if not problems:
                raise
            raise KvmError(e.errno, "SET_SREGS", f"{e.hint} Here: {' '.join(problems)}") from None

    def _get_struct(self, name: str, ctype: str) -> dict:
        c = ffi.new(f"{ctype} *")
        self._ioctl(name, c)
        return to_python(c[0])

    def _set_struct(self, name: str, ctype: str, value: dict, describe="") -> None:
        self._ioctl(name, ffi.new(f"{ctype} *", from_python(value)), describe)

    def get_fpu(self) -> dict:
        """KVM_GET_FPU: x87 and SSE state.

        >>> hex(Kvm().create_vm().create_vcpu(0).get_fpu()["fcw"])   # FNINIT's control word
        '0x37f'
        """
        return self._get_struct("GET_FPU", "struct kvm_fpu")

    def set_fpu(self, fpu: dict) -> None:
        """KVM_SET_FPU.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_fpu({**vcpu.get_fpu(), "fcw": 0x27F})   # double-precision rounding
        >>> hex(vcpu.get_fpu()["fcw"])
        '0x27f'
        """
        self._set_struct("SET_FPU", "struct kvm_fpu", fpu, f"fcw={fpu.get('fcw', 0):#x}")

    def get_vcpu_events(self) -> dict:
        """KVM_GET_VCPU_EVENTS: pending exceptions, interrupts and NMIs.

        >>> Kvm().create_vm().create_vcpu(0).get_vcpu_events()["exception"]["pending"]
        0
        """
        return self._get_struct("GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, events: dict) -> None:
        """KVM_SET_VCPU_EVENTS (what QEMU restores after migration).

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_vcpu_events(vcpu.get_vcpu_events())
        """
        self._set_struct("SET_VCPU_EVENTS", "struct kvm_vcpu_events", events)

    def get_xcrs(self) -> dict:
        """KVM_GET_XCRS: the extended control registers (XCR0 enables XSAVE state).

        >>> xcrs = Kvm().create_vm().create_vcpu(0).get_xcrs()
        >>> xcrs["xcrs"][0]["value"] & 1   # x87 state is always on in XCR0
        1
        """
        return self._get_struct("GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, xcrs: dict) -> None:
        """KVM_SET_XCRS.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_xcrs(vcpu.get_xcrs())
        """
        self._set_struct("SET_XCRS", "struct kvm_xcrs", xcrs, f"nr_xcrs={xcrs.get('nr_xcrs')}")

    def get_lapic(self) -> bytes:
        """The local APIC's 1 KiB register page (needs the in-kernel irqchip).

        >>> vm = Kvm().create_vm()
        >>> vm.create_irqchip()
        >>> bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
        >>> ap.get_lapic()[0x23]   # the APIC ID register's top byte: the vCPU's id
        1
        """
        return self._get_struct("GET_LAPIC", "struct kvm_lapic_state")["regs"]

    def get_mp_state(self) -> MpState:
        """KVM_GET_MP_STATE: runnable, halted, or (an AP) waiting for INIT/SIPI.

        >>> Kvm().create_vm().create_vcpu(0).get_mp_state()
        <MpState.RUNNABLE: 0>
        """
        return MpState(self._get_struct("GET_MP_STATE", "struct kvm_mp_state")["mp_state"])

    def set_mp_state(self, state: MpState | int) -> None:
        """KVM_SET_MP_STATE.

        >>> vm = Kvm().create_vm()
        >>> vm.create_irqchip()   # states other than RUNNABLE need the in-kernel LAPIC
        >>> vcpu = vm.create_vcpu(0)
        >>> vcpu.set_mp_state(MpState.HALTED)
        >>> vcpu.get_mp_state().name
        'HALTED'
        """
        self._set_struct("SET_MP_STATE", "struct kvm_mp_state", {"mp_state": int(state)},
                         MpState(state).name)

    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS: DR0-DR3, DR6, DR7.

        >>> hex(Kvm().create_vm().create_vcpu(0).get_debugregs().dr7)   # reset value
        '0x400'
        """
        c = self._get_struct("GET_DEBUGREGS", "struct kvm_debugregs")
        return DebugRegs(tuple(c["db"]), c["dr6"], c["dr7"], c["flags"])

    def set_debugregs(self, debugregs: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_debugregs(vcpu.get_debugregs().replace(db=(0x1000, 0, 0, 0)))
        >>> vcpu.get_debugregs().db
        (4096, 0, 0, 0)
        """
        self._set_struct("SET_DEBUGREGS", "struct kvm_debugregs",
                         {"db": list(debugregs.db), "dr6": debugregs.dr6, "dr7": debugregs.dr7,
                          "flags": debugregs.flags}, f"dr7={debugregs.dr7:#x}")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the MSRs KVM knows, by index (it stops at the first it does not).

        >>> Kvm().create_vm().create_vcpu(0).get_msrs([0x174])   # IA32_SYSENTER_CS
        {372: 0}
        """
        return self._read_msrs(indices)

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first it refuses).

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_msrs({0x174: 0x10})
        1
        >>> vcpu.get_msrs([0x174])
        {372: 16}
        """
        msrs = flexible("struct kvm_msrs", "struct kvm_msr_entry", len(values))
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = index, data
        return self._ioctl("SET_MSRS", msrs, ", ".join(f"{i:#x}={v:#x}" for i, v in values.items()))

    # --- CPUID, TSC ---------------------------------------------------------------------------
    def set_cpuid2(self, entries) -> None:
        """Give this vCPU its CPUID table (QEMU: kvm_arch_init_vcpu after cpu_x86_cpuid).

        >>> kvm = Kvm()
        >>> vcpu = kvm.create_vm().create_vcpu(0)
        >>> vcpu.set_cpuid2(kvm.get_supported_cpuid())
        """
        self._ioctl("SET_CPUID2", cpuid_to_c(list(entries)), f"nent={len(entries)}")

    def get_cpuid2(self, max_entries: int = 256):
        """KVM_GET_CPUID2: the table as KVM keeps it (which may differ from what was set:
        see `vlab.kvm.backend`).

        >>> kvm = Kvm()
        >>> vcpu = kvm.create_vm().create_vcpu(0)
        >>> vcpu.set_cpuid2(kvm.get_supported_cpuid())
        >>> len(vcpu.get_cpuid2()) == len(kvm.get_supported_cpuid())
        True
        """
        cpuid = flexible("struct kvm_cpuid2", "struct kvm_cpuid_entry2", max_entries)
        cpuid.nent = max_entries
        self._ioctl("GET_CPUID2", cpuid, f"nent={max_entries}")
        return cpuid_entries_from_c(cpuid)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency.

        >>> Kvm().create_vm().create_vcpu(0).get_tsc_khz() > 0
        True
        """
        return self._ioctl("GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (QEMU, with tsc-frequency=); another rate than the host's needs
        TSC scaling in the CPU.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_tsc_khz(vcpu.get_tsc_khz())
        """
        self._ioctl("SET_TSC_KHZ", khz, f"{khz} kHz")
