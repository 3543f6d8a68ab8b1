"""Which backend runs the guest, and the facts of it a learner can see.

The ioctl API is the same everywhere, but what happens behind KVM_RUN is not: VMX and SVM
run guest code on the hardware; the paravirtual `kvm_pvm` backend (nested KVM without
hardware virtualization) emulates guest kernel-mode code instruction by instruction; the
software accelerator (`tcg`, Unicorn) emulates everything. Every such difference is stated
here, once, as a field of `Backend`: `vlab doctor` prints them, the run loop's explanations,
the lessons and the tests ask them instead of assuming one host.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

_SYS_MODULE = Path("/sys/module")
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Backend:
    """What runs behind KVM_RUN (or the software accelerator's run) and how it shows.

    `kind` is "vmx", "svm", "kvm_pvm", "tcg" or "unknown"; `module` the kernel module
    (kvm_intel, kvm_amd, kvm_pvm) when there is one."""
    kind: str
    module: str | None
    nested: bool | None = None          # the module's `nested` parameter when it has one
    # CPL 0 guest code runs in KVM's instruction emulator (the vCPU stat insn_emulation
    # counts every instruction); on VMX and SVM it runs natively.
    emulates_kernel_mode: bool = False
    # The guest's CPUID instruction answers every leaf from the KVM_SET_CPUID2 table.
    cpuid_follows_table: bool = True
    # Leaves whose feature bits the guest's CPUID takes from the host instead (where
    # cpuid_follows_table is False): a model cannot hide a feature there.
    cpuid_raw_leaves: tuple[int, ...] = ()
    # What the table lacks, the guest cannot turn on (KVM: EFER.LME without lm is a #GP,
    # kvm_valid_efer); False where a masked feature is only hidden from CPUID.
    enforces_cpuid: bool = True
    # KVM_GET_CPUID2 gives back the table as set (KVM itself rewrites some bits: OSXSAVE,
    # APIC, leaf 0xD's sizes); False where the backend puts the host's raw bits back.
    get_cpuid2_as_set: bool = True
    # Under KVM_SET_GUEST_DEBUG single-step, a HLT exits as HLT (False: it is stepped over
    # like a NOP, one DEBUG exit past it).
    single_step_reports_hlt: bool = True
    # Where RIP stands when an OUT reaches userspace: "at" the OUT (KVM's fast PIO path
    # skips it only when the exit completes) or "past" it.
    out_exit_rip: str = "at"
    # After a triple fault (KVM_EXIT_SHUTDOWN): "kept" (RIP still at the faulting
    # instruction) or "reset" (SVM reinitialises the VMCB: RIP 0xfff0, CS F000).
    triple_fault_state: str = "kept"
    # 32-bit paging (plain, PSE, PAE) runs; kvm_pvm triple-faults on it.
    runs_32bit_paging: bool = True
    # A protected-mode IRET runs; KVM's emulator implements IRET only in real mode.
    runs_protected_mode_iret: bool = True
    # The vCPU stat io_exits counts port I/O exits.
    counts_io_exits: bool = True
    # DR0-DR3 breakpoints fire (not in an SVM guest emulated by QEMU's TCG).
    hardware_breakpoints: bool = True
    # KVM's tracepoints of VM entry and exit fire: kvm_entry, kvm_exit (the hardware's exit
    # reason) and kvm_inj_virq (vlab.kvm.kernel_trace); kvm_pvm emits none of them.
    traces_vm_entries: bool = True
    # What the guest's CPUID instruction answers once KVM_SET_CPUID2 has given the table.
    guest_cpuid: str = ("the guest's CPUID instruction answers from this table once it is set, "
                        "except the fields KVM keeps up to date itself (OSXSAVE, the APIC bit, "
                        "leaf 0xd's XSAVE sizes)")
    caveats: list[str] = field(default_factory=list)

    @property
    def hardware(self) -> str:
        return {"vmx": "VMX", "svm": "SVM"}.get(self.kind, "none")

    @property
    def label(self) -> str:
        """A short name for branching text: VMX, SVM, kvm_pvm, tcg or unknown."""
        return self.hardware if self.hardware != "none" else self.kind

    def describe(self) -> str:
        name = self.module or ("Unicorn" if self.kind == "tcg" else "unknown")
        lines = [f"backend: {name} (hardware virtualization: {self.hardware})"]
        lines += [f"  - {c}" for c in self.caveats]
        return "\n".join(lines)


VMX = Backend("vmx", "kvm_intel", caveats=[
    "Intel VMX: guest code runs on the CPU; exits are VMX exit reasons",
    "an OUT or IN exit reports RIP at the instruction; KVM moves past it when userspace "
    "completes the exit (the next KVM_RUN)",
    "single-step (KVM_SET_GUEST_DEBUG) of a HLT gives a HLT exit"])
SVM = replace(VMX, kind="svm", module="kvm_amd", triple_fault_state="reset", caveats=[
    "AMD SVM: guest code runs on the CPU; exits are SVM #VMEXIT codes",
    "an OUT or IN exit reports RIP at the instruction; KVM moves past it when userspace "
    "completes the exit (the next KVM_RUN)",
    "single-step (KVM_SET_GUEST_DEBUG) of a HLT gives a HLT exit",
    "after a triple fault (SHUTDOWN) KVM reinitialises the VMCB: the vCPU reads as reset "
    "(RIP 0xfff0), not where it faulted"])
KVM_PVM = Backend(
    "kvm_pvm", "kvm_pvm", emulates_kernel_mode=True, cpuid_follows_table=False,
    cpuid_raw_leaves=(0x1, 0x7),
    get_cpuid2_as_set=False, single_step_reports_hlt=False, out_exit_rip="past",
    guest_cpuid="the guest's CPUID instruction (and KVM_GET_CPUID2) returns the host's raw bits "
                "for most of leaves 1 and 7, whatever this table says; the bits KVM emulates "
                "(x2apic, hypervisor, ...) and the other leaves follow it",
    runs_32bit_paging=False, runs_protected_mode_iret=False, counts_io_exits=False,
    traces_vm_entries=False, caveats=[
        "guest code at CPL0 (kernel mode) is executed by KVM's instruction emulator, about "
        "1.8 M instructions/s, visible as the vCPU stat insn_emulation; code at CPL3 runs "
        "natively",
        "the guest's CPUID instruction (and KVM_GET_CPUID2) follows the KVM_SET_CPUID2 table "
        "for most leaves (vendor, 0x80000001 with LM, KVM's 0x40000000 leaves) but returns "
        "the host's raw feature bits for leaves 1 and 7, whatever the table says",
        "single-step (KVM_SET_GUEST_DEBUG) steps over HLT without a HLT exit",
        "an OUT exit reports RIP past the OUT (an IN: at the IN)",
        "32-bit paging (plain, PSE or PAE) is not supported: a guest that runs with CR0.PG "
        "set outside long mode triple-faults (SHUTDOWN) at its first instruction; real mode, "
        "unpaged protected mode and long mode work",
        "KVM's instruction emulator implements IRET only in real mode, so a protected-mode "
        "interrupt handler that returns with IRET ends in INTERNAL_ERROR (emulation failure)",
        "the vCPU stat io_exits stays 0 even when every exit is port I/O; count in userspace",
        "hardware details (VMX exit reasons, VMCS, FAIL_ENTRY reason codes) are not visible"])
TCG = Backend(
    "tcg", None, enforces_cpuid=False, out_exit_rip="past", traces_vm_entries=False,
    guest_cpuid="the software CPU's CPUID instruction answers every leaf from this table",
    caveats=[
        "no KVM: Unicorn (QEMU's TCG code) translates and runs every guest instruction in "
        "software; there are no VM entries, and the counters are the emulator's own",
        "an OUT or IN returns to the run loop past the instruction",
        "the CPUID instruction answers every leaf from the table the vCPU was given, but a "
        "feature masked there is only hidden: without lm the CPU still enters long mode"])
_BY_MODULE = {b.module: b for b in (VMX, SVM, KVM_PVM)}
_TCG_EMULATED_ARTIFACTS = [
    "this SVM host is itself emulated by QEMU's TCG (model name 'QEMU TCG CPU'): hardware "
    "breakpoints (DR0-DR3) never fire in its guests, an emulation artifact, not AMD's "
    "behaviour"]


def detect(sys_module: Path = _SYS_MODULE, cpuinfo: Path = _CPUINFO) -> Backend:
    """Name the vendor module KVM runs on, from /sys/module, with its facts."""
    for module, known in _BY_MODULE.items():
        path = sys_module / module
        if path.exists():
            nested_file = path / "parameters" / "nested"
            nested = nested_file.read_text().strip() in ("Y", "1") if nested_file.exists() else None
            backend = replace(known, nested=nested, caveats=list(known.caveats))
            if known.kind == "svm" and _tcg_emulated(cpuinfo):
                backend = replace(backend, hardware_breakpoints=False,
                                  caveats=backend.caveats + _TCG_EMULATED_ARTIFACTS)
            return backend
    others = sorted(p.name for p in sys_module.glob("kvm_*")) if sys_module.exists() else []
    module = others[0] if others else None
    caveats = [f"unrecognised backend {module}: hardware-specific details may differ"] if module else []
    return Backend("unknown", module, caveats=caveats)


def _tcg_emulated(cpuinfo: Path) -> bool:
    """The CPU is QEMU's TCG model (`-cpu max` under TCG), as on the SVM test host."""
    try:
        return "QEMU TCG CPU" in cpuinfo.read_text()
    except OSError:
        return False
