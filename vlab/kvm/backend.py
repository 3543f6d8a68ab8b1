"""Which KVM backend the host runs, and what that changes for a learner.

The ioctl API is the same everywhere, but what happens behind KVM_RUN is not: VMX and SVM
run guest code on the hardware; the paravirtual `kvm_pvm` backend (nested KVM without
hardware virtualization) emulates guest kernel-mode code instruction by instruction. vlab
states such differences where they show instead of hiding them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_SYS_MODULE = Path("/sys/module")

_CAVEATS = {
    "kvm_intel": ["Intel VMX: guest code runs on the CPU; exits are VMX exit reasons."],
    "kvm_amd": ["AMD SVM: guest code runs on the CPU; exits are SVM #VMEXIT codes."],
    "kvm_pvm": [
        "guest code at CPL0 (kernel mode) is executed by KVM's instruction emulator, about "
        "1.8 M instructions/s, visible as the vCPU stat insn_emulation; code at CPL3 runs "
        "natively",
        "the guest's CPUID instruction follows the KVM_SET_CPUID2 table for most leaves "
        "(vendor, 0x80000001 with LM, KVM's 0x40000000 leaves) but returns the host's raw "
        "feature bits for leaves 1 and 7, whatever the table says",
        "single-step (KVM_SET_GUEST_DEBUG) steps over HLT without a HLT exit",
        "32-bit paging (plain, PSE or PAE) is not supported: a guest that runs with CR0.PG "
        "set outside long mode triple-faults (SHUTDOWN) at its first instruction; real mode, "
        "unpaged protected mode and long mode work",
        "KVM's instruction emulator implements IRET only in real mode, so a protected-mode "
        "interrupt handler that returns with IRET ends in INTERNAL_ERROR (emulation failure)",
        "the vCPU stat io_exits stays 0 even when every exit is port I/O; count in userspace",
        "hardware details (VMX exit reasons, VMCS, FAIL_ENTRY reason codes) are not visible",
    ],
}


@dataclass(frozen=True)
class Backend:
    module: str | None                  # kvm_intel, kvm_amd, kvm_pvm, ... or None
    nested: bool | None                 # the module's `nested` parameter when it has one
    caveats: list[str] = field(default_factory=list)

    @property
    def emulates_kernel_mode(self) -> bool:
        return self.module == "kvm_pvm"

    @property
    def runs_32bit_paging(self) -> bool:
        return self.module != "kvm_pvm"

    @property
    def hardware(self) -> str:
        return {"kvm_intel": "VMX", "kvm_amd": "SVM"}.get(self.module or "", "none")

    def describe(self) -> str:
        lines = [f"backend: {self.module or 'unknown'} (hardware virtualization: {self.hardware})"]
        lines += [f"  - {c}" for c in self.caveats]
        return "\n".join(lines)


def detect(sys_module: Path = _SYS_MODULE) -> Backend:
    """Name the vendor module KVM runs on, from /sys/module."""
    for module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        path = sys_module / module
        if path.exists():
            nested_file = path / "parameters" / "nested"
            nested = None
            if nested_file.exists():
                nested = nested_file.read_text().strip() in ("Y", "1")
            return Backend(module, nested, list(_CAVEATS[module]))
    others = sorted(p.name for p in sys_module.glob("kvm_*")) if sys_module.exists() else []
    module = others[0] if others else None
    caveats = [f"unrecognised backend {module}: hardware-specific details may differ"] if module else []
    return Backend(module, None, caveats)
