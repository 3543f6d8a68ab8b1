"""KVM's tracepoints as typed records: what happened inside one KVM_RUN, in the kernel.

Each record is a frozen dataclass with the tracepoint's `name`, `timestamp_ns` (the trace
clock: CLOCK_MONOTONIC), the thread (`tid`) and CPU it ran on, `vcpu_id` where the event
carries one, and `describe()`, one line a learner reads. Values that the kernel's print
format names through a symbol table (kvm_exit's reason, the emulator's CPU mode, KVM_EXIT_*)
carry that name, read from the format file by libtraceevent (`vlab.kvm.traceevent`).

    kvm_entry, kvm_exit           KvmEntry, KvmExit          the hardware's VM entry and exit
    kvm_emulate_insn              KvmEmulateInsn             one instruction KVM's emulator ran
    kvm_pio, kvm_mmio             KvmPio, KvmMmio            port and memory-mapped I/O
    kvm_msr, kvm_cr, kvm_cpuid    KvmMsr, KvmCr, KvmCpuid    what KVM answered itself
    kvm_inj_virq, _exception      KvmInjVirq, KvmInjException  events injected into the guest
    kvm_set_irq, kvm_apic*        KvmSetIrq, KvmApic, KvmApicAcceptIrq, KvmApicIpi
    kvm_page_fault, kvm_fpu       KvmPageFault, KvmFpu
    kvm_vcpu_wakeup               KvmVcpuWakeup              a halted vCPU running again
    kvm_userspace_exit            KvmUserspaceExit           KVM_RUN returning to userspace
    anything else                 RawEvent(name, fields)
"""
from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

# kvm_exit's `isa` (arch/x86/kvm/trace.h: KVM_ISA_VMX, KVM_ISA_SVM)
ISA_NAMES = {1: "VMX", 2: "SVM"}
# kvm_emulate_insn's modes, as its print format names them, to Capstone's code sizes
_MODE_BITS = {"real": 16, "vm16": 16, "prot16": 16, "prot32": 32, "prot64": 64}


@dataclass(frozen=True)
class KernelEvent:
    """What every record has."""
    timestamp_ns: int
    tid: int
    cpu: int
    name: ClassVar[str] = ""

    def describe(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class KvmEntry(KernelEvent):
    """VM entry (vcpu_enter_guest, right before VMRESUME/VMRUN)."""
    name: ClassVar[str] = "kvm_entry"
    vcpu_id: int = 0
    rip: int = 0
    immediate_exit: bool = False

    def describe(self) -> str:
        return f"kvm_entry: vcpu {self.vcpu_id} enters the guest at rip {self.rip:#x}" + (
            " (immediate exit)" if self.immediate_exit else "")


@dataclass(frozen=True)
class KvmExit(KernelEvent):
    """A hardware VM exit (VMX exit reason or SVM #VMEXIT code), before KVM handles it."""
    name: ClassVar[str] = "kvm_exit"
    vcpu_id: int = 0
    reason: int = 0
    reason_name: str = ""
    isa: str = ""                 # "VMX", "SVM", or "isa N" for a backend's own
    rip: int = 0
    info1: int = 0
    info2: int = 0
    intr_info: int = 0
    error_code: int = 0

    def describe(self) -> str:
        return (f"kvm_exit: vcpu {self.vcpu_id} {self.isa} exit {self.reason_name} "
                f"at rip {self.rip:#x} (info1 {self.info1:#x}, info2 {self.info2:#x})")


@dataclass(frozen=True)
class KvmEmulateInsn(KernelEvent):
    """One instruction executed by KVM's instruction emulator (x86_emulate_instruction)."""
    name: ClassVar[str] = "kvm_emulate_insn"
    rip: int = 0
    cs_base: int = 0
    insn: bytes = b""
    mode: str = ""                # real, vm16, prot16, prot32, prot64
    failed: bool = False

    @cached_property
    def disassembly(self) -> str:
        """The instruction, disassembled by Capstone in the event's mode."""
        import capstone
        bits = _MODE_BITS.get(self.mode, 64)
        md = capstone.Cs(capstone.CS_ARCH_X86, {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32,
                                                64: capstone.CS_MODE_64}[bits])
        insn = next(md.disasm(self.insn, self.rip), None)
        return f"{insn.mnemonic} {insn.op_str}".strip() if insn else f"(bytes {self.insn.hex(' ')})"

    def describe(self) -> str:
        return (f"kvm_emulate_insn: {self.cs_base:x}:{self.rip:x} {self.disassembly:<24} "
                f"[{self.insn.hex(' ')}] ({self.mode})" + (" FAILED" if self.failed else ""))


@dataclass(frozen=True)
class KvmPio(KernelEvent):
    name: ClassVar[str] = "kvm_pio"
    direction: str = "out"        # "in" or "out"
    port: int = 0
    size: int = 0
    count: int = 0
    value: int = 0

    def describe(self) -> str:
        return (f"kvm_pio: {self.direction} port {self.port:#x} size {self.size} "
                f"count {self.count} value {self.value:#x}")


@dataclass(frozen=True)
class KvmMmio(KernelEvent):
    name: ClassVar[str] = "kvm_mmio"
    kind: str = ""                # read, write, unsatisfied-read
    length: int = 0
    gpa: int = 0
    value: int = 0

    def describe(self) -> str:
        return f"kvm_mmio: {self.kind} {self.length} bytes at {self.gpa:#x} value {self.value:#x}"


@dataclass(frozen=True)
class KvmMsr(KernelEvent):
    name: ClassVar[str] = "kvm_msr"
    write: bool = False
    index: int = 0
    data: int = 0
    exception: bool = False

    def describe(self) -> str:
        return (f"kvm_msr: {'wrmsr' if self.write else 'rdmsr'} {self.index:#x} = {self.data:#x}"
                + (" (#GP)" if self.exception else ""))


@dataclass(frozen=True)
class KvmCr(KernelEvent):
    name: ClassVar[str] = "kvm_cr"
    write: bool = False
    cr: int = 0
    value: int = 0

    def describe(self) -> str:
        return f"kvm_cr: {'write' if self.write else 'read'} cr{self.cr} = {self.value:#x}"


@dataclass(frozen=True)
class KvmCpuid(KernelEvent):
    """A CPUID KVM answered from the vCPU's table (kvm_emulate_cpuid)."""
    name: ClassVar[str] = "kvm_cpuid"
    function: int = 0
    index: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    found: bool = True

    def describe(self) -> str:
        return (f"kvm_cpuid: leaf {self.function:#x}.{self.index} -> eax {self.eax:#x} "
                f"ebx {self.ebx:#x} ecx {self.ecx:#x} edx {self.edx:#x}"
                + ("" if self.found else " (no such entry in the table)"))


@dataclass(frozen=True)
class KvmInjVirq(KernelEvent):
    name: ClassVar[str] = "kvm_inj_virq"
    vector: int = 0
    soft: bool = False
    reinjected: bool = False

    def describe(self) -> str:
        return (f"kvm_inj_virq: {'INTn' if self.soft else 'IRQ'} vector {self.vector:#x}"
                + (" (reinjected)" if self.reinjected else ""))


@dataclass(frozen=True)
class KvmInjException(KernelEvent):
    name: ClassVar[str] = "kvm_inj_exception"
    exception: int = 0
    exception_name: str = ""
    error_code: int | None = None
    reinjected: bool = False

    def describe(self) -> str:
        code = "" if self.error_code is None else f" error code {self.error_code:#x}"
        return f"kvm_inj_exception: {self.exception_name or self.exception}{code}" + (
            " (reinjected)" if self.reinjected else "")


@dataclass(frozen=True)
class KvmSetIrq(KernelEvent):
    name: ClassVar[str] = "kvm_set_irq"
    gsi: int = 0
    level: int = 0
    source: int = 0

    def describe(self) -> str:
        return f"kvm_set_irq: gsi {self.gsi} level {self.level} (source {self.source})"


@dataclass(frozen=True)
class KvmApic(KernelEvent):
    """A local APIC register access KVM handled."""
    name: ClassVar[str] = "kvm_apic"
    write: bool = False
    reg: int = 0
    reg_name: str = ""
    value: int = 0

    def describe(self) -> str:
        return (f"kvm_apic: {'write' if self.write else 'read'} "
                f"{self.reg_name or hex(self.reg)} = {self.value:#x}")


@dataclass(frozen=True)
class KvmApicAcceptIrq(KernelEvent):
    name: ClassVar[str] = "kvm_apic_accept_irq"
    apic_id: int = 0
    vector: int = 0
    delivery: str = ""
    level_triggered: bool = False

    def describe(self) -> str:
        return (f"kvm_apic_accept_irq: APIC {self.apic_id} accepts vector {self.vector} "
                f"({self.delivery}, {'level' if self.level_triggered else 'edge'})")


@dataclass(frozen=True)
class KvmApicIpi(KernelEvent):
    name: ClassVar[str] = "kvm_apic_ipi"
    dest_id: int = 0
    icr_low: int = 0
    delivery: str = ""

    def describe(self) -> str:
        return (f"kvm_apic_ipi: {self.delivery} IPI vector {self.icr_low & 0xff} "
                f"to APIC {self.dest_id:#x}")


@dataclass(frozen=True)
class KvmPageFault(KernelEvent):
    name: ClassVar[str] = "kvm_page_fault"
    vcpu_id: int = 0
    rip: int = 0
    address: int = 0
    error_code: int = 0

    def describe(self) -> str:
        return (f"kvm_page_fault: vcpu {self.vcpu_id} at rip {self.rip:#x}: address "
                f"{self.address:#x} error code {self.error_code:#x}")


@dataclass(frozen=True)
class KvmFpu(KernelEvent):
    """The guest's FPU state loaded on entry to KVM_RUN, put back on the way out."""
    name: ClassVar[str] = "kvm_fpu"
    load: bool = True

    def describe(self) -> str:
        return f"kvm_fpu: {'load' if self.load else 'unload'} the guest's FPU state"


@dataclass(frozen=True)
class KvmVcpuWakeup(KernelEvent):
    """A halted vCPU runs again (kvm_vcpu_halt), after `ns` of waiting in vcpu_block or of
    polling; `valid`: something it was waiting for (an interrupt) woke it."""
    name: ClassVar[str] = "kvm_vcpu_wakeup"
    ns: int = 0
    waited: bool = False
    valid: bool = False

    def describe(self) -> str:
        return (f"kvm_vcpu_wakeup: the halted vCPU runs again after {self.ns / 1e6:,.3f} ms of "
                f"{'waiting' if self.waited else 'polling'}" + ("" if self.valid else " (no interrupt)"))


@dataclass(frozen=True)
class KvmUserspaceExit(KernelEvent):
    """KVM_RUN returning to userspace: the exit reason, or the errno (EINTR: a signal or
    immediate_exit)."""
    name: ClassVar[str] = "kvm_userspace_exit"
    reason: int = 0
    reason_name: str = ""         # KVM_EXIT_IO... as the kernel names it; EINTR... on errors
    errno: int = 0

    def describe(self) -> str:
        return f"kvm_userspace_exit: {self.reason_name}"


@dataclass(frozen=True)
class RawEvent(KernelEvent):
    """Any other kvm tracepoint, its fields as the format file names them."""
    name: str = ""
    fields: dict = field(default_factory=dict)

    def describe(self) -> str:
        text = " ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v.hex() if isinstance(v, bytes) else v}"
                        for k, v in self.fields.items())
        return f"{self.name}: {text}"


def exit_outcomes(events) -> list[tuple[KvmExit, bool]]:
    """Each hardware exit (kvm_exit) of one KVM_RUN's events, and whether KVM handled it
    itself: what `handle_exit` returned. 1 (handled) when `vcpu_run` went round again (a
    kvm_entry follows, or the vCPU halted in vcpu_block: kvm_vcpu_wakeup) or when KVM_RUN
    returned an error (EINTR: a signal stopped the loop after the exit was handled); 0 for
    the last exit before KVM_RUN returned to userspace because KVM needed it."""
    failed = any(e.errno for e in events if isinstance(e, KvmUserspaceExit))
    outcomes, resumed = [], failed
    for event in reversed(events):
        if event.name in ("kvm_entry", "kvm_vcpu_wakeup"):
            resumed = True
        elif isinstance(event, KvmExit):
            outcomes.append((event, resumed))
            resumed = True
    return outcomes[::-1]


def _kvm_exit(base, v, fmt):
    isa = v["isa"]
    name = fmt.symbol("exit_reason", v) if isa in ISA_NAMES else None
    return KvmExit(*base, v["vcpu_id"], v["exit_reason"], name or f"{v['exit_reason']:#x}",
                   ISA_NAMES.get(isa, f"isa {isa}"), v["guest_rip"], v["info1"], v["info2"],
                   v["intr_info"], v["error_code"])


def _emulate_insn(base, v, fmt):
    return KvmEmulateInsn(*base, v["rip"], v["csbase"], v["insn"][:v["len"]],
                          fmt.symbol("flags", v) or f"flags {v['flags']:#x}", bool(v["failed"]))


def _userspace_exit(base, v, fmt):
    err = v["errno"]
    name = (_errno.errorcode.get(-err, str(err)) if err < 0
            else fmt.symbol("reason", v) or str(v["reason"]))
    return KvmUserspaceExit(*base, v["reason"], name, err)


_DECODERS = {
    "kvm_entry": lambda b, v, f: KvmEntry(*b, v["vcpu_id"], v["rip"], bool(v.get("immediate_exit", 0))),
    "kvm_exit": _kvm_exit,
    "kvm_emulate_insn": _emulate_insn,
    "kvm_pio": lambda b, v, f: KvmPio(*b, "out" if v["rw"] else "in", v["port"], v["size"],
                                      v["count"], v["val"]),
    "kvm_mmio": lambda b, v, f: KvmMmio(*b, f.symbol("type", v) or str(v["type"]), v["len"],
                                        v["gpa"], v["val"]),
    "kvm_msr": lambda b, v, f: KvmMsr(*b, bool(v["write"]), v["ecx"], v["data"], bool(v["exception"])),
    "kvm_cr": lambda b, v, f: KvmCr(*b, bool(v["rw"]), v["cr"], v["val"]),
    "kvm_cpuid": lambda b, v, f: KvmCpuid(*b, v["function"], v["index"], v["rax"], v["rbx"],
                                          v["rcx"], v["rdx"], bool(v["found"])),
    "kvm_inj_virq": lambda b, v, f: KvmInjVirq(*b, v["vector"], bool(v["soft"]), bool(v["reinjected"])),
    "kvm_inj_exception": lambda b, v, f: KvmInjException(
        *b, v["exception"], f.symbol("exception", v) or "",
        v["error_code"] if v["has_error"] else None, bool(v["reinjected"])),
    "kvm_set_irq": lambda b, v, f: KvmSetIrq(*b, v["gsi"], v["level"], v["irq_source_id"]),
    "kvm_apic": lambda b, v, f: KvmApic(*b, bool(v["rw"]), v["reg"], f.symbol("reg", v) or "", v["val"]),
    "kvm_apic_accept_irq": lambda b, v, f: KvmApicAcceptIrq(
        *b, v["apicid"], v["vec"], f.symbol("dm", v) or "", bool(v["tm"])),
    "kvm_apic_ipi": lambda b, v, f: KvmApicIpi(*b, v["dest_id"], v["icr_low"],
                                               f.symbol("icr_low", v) or ""),
    "kvm_page_fault": lambda b, v, f: KvmPageFault(*b, v["vcpu_id"], v["guest_rip"],
                                                   v["fault_address"], v["error_code"]),
    "kvm_fpu": lambda b, v, f: KvmFpu(*b, bool(v["load"])),
    "kvm_vcpu_wakeup": lambda b, v, f: KvmVcpuWakeup(*b, v["ns"], bool(v["waited"]), bool(v["valid"])),
    "kvm_userspace_exit": _userspace_exit,
}


class KernelEvents(Sequence):
    """One KVM_RUN's events, as a tuple of records that are decoded when first read: a run
    loop attaches them to every exit, most of which nobody looks at."""
    __slots__ = ("_raw", "_events")

    def __init__(self, raw: list):
        self._raw = raw             # [(timestamp_ns, cpu, EventFormat, EventFormat.unpack())]
        self._events: tuple | None = None

    def _decoded(self) -> tuple[KernelEvent, ...]:
        if self._events is None:
            self._events = tuple(decode(fmt, fmt.values(unpacked), ts, cpu)
                                 for ts, cpu, fmt, unpacked in self._raw)
            self._raw = ()
        return self._events

    def __getitem__(self, index):
        return self._decoded()[index]

    def __len__(self) -> int:
        return len(self._events) if self._events is not None else len(self._raw)

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:
        if isinstance(other, (tuple, KernelEvents)):
            return self._decoded() == tuple(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"KernelEvents({self._decoded()!r})"


def decode(fmt, values: dict, timestamp_ns: int, cpu: int) -> KernelEvent:
    """The typed record for one event (`fmt`: its `traceevent.EventFormat`, `values`: its
    unpacked fields); `RawEvent` for an event without a type, or whose format file has
    fields this kernel renamed."""
    base = (timestamp_ns, values["common_pid"], cpu)
    decoder = _DECODERS.get(fmt.name)
    if decoder is not None:
        try:
            return decoder(base, values, fmt)
        except KeyError:
            pass
    fields = {k: v for k, v in values.items() if k != "common_pid"}
    return RawEvent(*base, fmt.name, fields)


__all__ = ["KernelEvent", "KvmEntry", "KvmExit", "KvmEmulateInsn", "KvmPio", "KvmMmio", "KvmMsr",
           "KvmCr", "KvmCpuid", "KvmInjVirq", "KvmInjException", "KvmSetIrq", "KvmApic",
           "KvmApicAcceptIrq", "KvmApicIpi", "KvmPageFault", "KvmFpu", "KvmVcpuWakeup",
           "KvmUserspaceExit", "RawEvent", "KernelEvents", "decode", "exit_outcomes", "ISA_NAMES"]
