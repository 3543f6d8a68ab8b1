"""`vlab.Lab`: bring up a VM the way QEMU does, one stage per call, with a record of each.

    lab = vlab.Lab()            # accel="auto": kvm when /dev/kvm is usable, else tcg
    lab.next_stage()            # kvm_init, x86_cpu_realizefn, kvm_init_vcpu, ...
    lab.step(); lab.run()       # kvm_cpu_exec: one instruction, or until the guest stops

Every stage returns a `StageRecord`; calling one before what it needs exists raises
`StageError` naming the stage to run first.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..accel import explain_auto, select
from ..kvm import Cap, Shutdown
from ..kvm.trace import IoctlRecord, Tracer
from ..machine.assembler import assemble
from ..machine.board import Machine, parse_size
from ..machine.cpu_modes import CpuMode
from ..machine.examples import EXAMPLES
from ..machine.exitlog import ExitLog
from ..machine.loaders import load_elf, read_image
from ..machine.runloop import RunResult, StepResult
from ..machine.snapshot import RegisterSnapshot, VcpuState
from .cpuid import CpuidTable
from .observable import Observable
from .records import StageRecord
from .registers import RegisterModel, cpu_mode
from .stages import STAGE_BY_NAME, STAGES, StageError
from ..x86 import (EFER_LME, MSR_EFER, MSR_IA32_ARCH_CAPABILITIES, MSR_IA32_UCODE_REV,
                   PAGE_SIZE)

# QEMU's kvm_arch_init: the identity-map page and, right above it, the three TSS pages that
# Intel's real-mode emulation (vm86) needs, just below the 4 GiB BIOS area.
IDENTITY_MAP_ADDR = 0xFEFFC000
# Capabilities QEMU 5.0 refuses to run without: kvm_required_capabilites (kvm-all.c), then
# x86's kvm_arch_required_capabilities (target/i386/kvm.c). QEMU 8.2 added INTERNAL_ERROR_DATA,
# IOEVENTFD, IOEVENTFD_ANY_LENGTH, and for x86 SIGNAL_MSI and IRQ_ROUTING.
REQUIRED_CAPS = (Cap.USER_MEMORY, Cap.DESTROY_MEMORY_REGION_WORKS, Cap.JOIN_MEMORY_REGIONS_WORKS,
                 Cap.SET_TSS_ADDR, Cap.EXT_CPUID, Cap.MP_STATE)
# QEMU's identity-map base where KVM cannot move it (no KVM_CAP_SET_IDENTITY_MAP_ADDR).
LEGACY_IDENTITY_MAP_ADDR = 0xFFFBC000
# MSRs kvm_init_msrs copies from KVM's feature MSRs into the vCPU.
FEATURE_MSRS_TO_SET = {MSR_IA32_ARCH_CAPABILITIES: "IA32_ARCH_CAPABILITIES",
                       MSR_IA32_UCODE_REV: "IA32_UCODE_REV"}
GUEST_ORG = 0x8000
WRMSR = b"\x0f\x30"
RUN_RECORD_LIMIT = 64   # ioctls kept in the kvm_cpu_exec record (the rest are counted)


@dataclass
class Guest:
    """What pc_memory_init loads: code at an address, entered at `entry`."""
    name: str
    code: bytes
    load_address: int
    entry: int
    source: str | None = None
    assembly: object | None = None


@dataclass
class Snapshot:
    vcpus: list[VcpuState]
    memory: dict[str, bytes]
    exits: int


class Lab(Observable):
    """A VM brought up stage by stage, as QEMU's main thread and vCPU threads do.

    Subscribers (`lab.subscribe(callback)`) hear `event=` "stage" (with `stage=` its name),
    "step", "step_back", "run" and "restore", so views made before a stage existed can
    attach to what it created."""

    def __init__(self, accel: str = "auto", memory: int | str = "16M", cpu: str = "host",
                 vcpus: int = 1, mode: CpuMode | str = "real", irqchip: bool = False):
        super().__init__()
        if vcpus < 1:
            raise ValueError(f"vcpus={vcpus}: a VM needs at least one vCPU")
        self.accel_choice = accel
        self.memory_size = parse_size(memory)
        self.cpu_model = cpu
        self.nr_vcpus = vcpus
        self.mode = CpuMode(mode)
        self.irqchip = irqchip
        self.records: dict[str, StageRecord] = {}
        self.tracer = Tracer()   # this Lab's ioctls, and only them, go to its stage records
        self.provided: set[str] = set()
        self.accel = None
        self.vm = None
        self.machine: Machine | None = None
        self.cpuid: CpuidTable | None = None
        self.vcpus: list = []
        self.runners: list = []
        self.registers: list[RegisterModel] = []
        self.exit_logs: list[ExitLog] = []
        self.guest: Guest | None = None
        self.backend = None
        self._msr_indices: list[int] = []            # KVM_GET_MSR_INDEX_LIST (kvm_init)
        self._feature_msr_indices: list[int] = []    # KVM_GET_MSR_FEATURE_INDEX_LIST
        self._history: list[tuple[VcpuState, dict[int, bytes]]] = []
        self._shadow: bytearray | None = None

    # -- stage machinery ------------------------------------------------------------------------
    @property
    def stages(self) -> list[dict]:
        """Every stage with its status: done, next (what `next_stage()` runs) or waiting."""
        rows, nxt = [], self._next_name()
        for stage in STAGES:
            status = "done" if stage.name in self.records else ("next" if stage.name == nxt else "waiting")
            rows.append({"stage": stage.name, "title": stage.title, "status": status})
        return rows

    def _next_name(self) -> str | None:
        return next((s.name for s in STAGES if s.name not in self.records), None)

    def next_stage(self) -> StageRecord:
        """Perform the next stage in QEMU's order."""
        name = self._next_name()
        if name is None:
            raise StageError("every stage is done: use lab.run() or lab.step() to go on")
        return getattr(self, name)()

    def bring_up(self) -> list[StageRecord]:
        """Every stage up to (not including) kvm_cpu_exec."""
        return [self.next_stage() for s in STAGES[:-1] if s.name not in self.records]

    def _check(self, name: str) -> None:
        stage = STAGE_BY_NAME[name]
        if name in self.records and name != "kvm_cpu_exec":
            raise StageError(f"{name} is already done; create a new Lab to start over")
        missing = [need for need in stage.needs if need not in self.provided]
        if missing:
            needed = set(missing)  # and, transitively, what their stages need
            for earlier in reversed(STAGES):
                if needed & set(earlier.provides):
                    needed.update(n for n in earlier.needs if n not in self.provided)
            first = next(s.name for s in STAGES if needed & set(s.provides))
            sources = ", ".join(f"{need} (from {next(s.name for s in STAGES if need in s.provides)})"
                                for need in missing)
            raise StageError(f"{name} needs {sources}: call lab.{first}() first "
                             f"(or lab.next_stage())")

    def _stage(self, name: str, body, ioctl_limit: int | None = None) -> StageRecord:
        self._check(name)
        record = StageRecord(STAGE_BY_NAME[name], self.accel.name if self.accel else "?")
        record.before = self._state()
        calls: list[IoctlRecord] = []
        counted = [0]

        def keep(call: IoctlRecord) -> None:
            counted[0] += 1
            if ioctl_limit is None or len(calls) < ioctl_limit:
                calls.append(call)

        unsubscribe = self.tracer.subscribe(keep)
        started = time.perf_counter()
        try:
            body(record)
        finally:
            unsubscribe()
        record.seconds = time.perf_counter() - started
        record.ioctls = calls
        if ioctl_limit is not None and counted[0] > len(calls):
            record.notes.append(f"{counted[0]} ioctls in all; the first {len(calls)} are listed")
        record.accel = self.accel.name if self.accel else "?"
        record.after = self._state()
        self.records[name] = record
        self.provided.update(record.stage.provides)
        self.notify(event="stage", stage=name)
        return record

    def _state(self) -> dict:
        state: dict = {}
        if self.accel is not None:
            state["accelerator"] = self.accel.name
        if self.accel is not None and self.accel.name == "kvm":
            state["/dev/kvm fd"] = self.accel.kvm.fd
        if self.vm is not None and hasattr(self.vm, "vm"):
            state["VM fd"] = self.vm.vm.fd
        if self.cpuid is not None:
            state["CPUID entries"] = len(self.cpuid.entries)
        if self.vcpus:
            state["vCPUs"] = [f"vcpu{v.id}" + (f" fd={v.fd}" if hasattr(v, "fd") else "") for v in self.vcpus]
        if self.machine is not None and self.machine.memory.regions:
            state["memory slots"] = [f"slot {r.slot}: {r.gpa:#x}+{r.size:#x} {r.kind}"
                                     for r in self.machine.memory.regions if r.slot is not None]
            state["devices"] = sorted(self.machine.devices)
        for vcpu in self.vcpus:
            snap = RegisterSnapshot.capture(vcpu)
            regs, sregs = snap.regs, snap.sregs
            state[f"vcpu{vcpu.id} registers"] = (
                f"{cpu_mode(snap)} mode, rip={regs.rip:#x} rsp={regs.rsp:#x} rbx={regs.rbx:#x} "
                f"cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} efer={sregs.efer:#x}")
        return state

    def _kvm(self) -> bool:
        return self.accel is not None and self.accel.name == "kvm"

    # -- 1. kvm_init ---------------------------------------------------------------------------------
    def kvm_init(self) -> StageRecord:
        """Open the accelerator and create the VM (QEMU: kvm_init, then kvm_arch_init)."""
        self._check("kvm_init")
        # `auto` probes /dev/kvm on a throwaway fd first, as QEMU tries each accelerator in
        # turn; that probe is not part of the chosen accelerator's bring-up.
        choice, reason = explain_auto() if self.accel_choice == "auto" else (self.accel_choice, None)

        def body(record: StageRecord) -> None:
            self.accel = select(choice, tracer=self.tracer)
            if reason:
                self.accel.reason = reason
            record.notes.append(f"accelerator: {self.accel.reason}")
            self.backend = self.accel.backend
            if self._kvm():
                self._kvm_init(record)
            else:
                record.actions.append("no /dev/kvm to open: Unicorn (QEMU's TCG role) will "
                                      "translate and run the guest's instructions in software")
                record.notes.append(self.backend.describe())
                self.vm = self.accel.create_vm()
                record.actions.append("uc_open(UC_ARCH_X86, UC_MODE_64) in place of KVM_CREATE_VM")
                if self.irqchip:
                    record.actions.append("irqchip=True not honoured: the software accelerator "
                                          "has no interrupt controller, so HLT still exits to "
                                          "userspace")
            self.machine = Machine(self.accel, self.vm, ram_size=self.memory_size)
        return self._stage("kvm_init", body)

    def _kvm_init(self, record: StageRecord) -> None:
        """kvm_init's ioctls in QEMU 5.0's order: the API version, KVM_CREATE_VM, the vCPU
        limits and required capabilities, then kvm_arch_init and kvm_irqchip_create."""
        kvm = self.accel.kvm
        record.actions.append(f"open('/dev/kvm', O_RDWR|O_CLOEXEC) = fd {kvm.fd}")
        version = kvm.get_api_version()
        if version != 12:
            raise StageError(f"KVM_GET_API_VERSION returned {version}; QEMU and vlab need 12")
        self.vm = self.accel.create_vm()
        # kvm_recommended_vcpus asks the VM fd, kvm_max_vcpus /dev/kvm; 0 means "not said"
        recommended = self.vm.check_extension(Cap.NR_VCPUS) or 4
        maximum = kvm.check_extension(Cap.MAX_VCPUS) or recommended
        if self.nr_vcpus > maximum:
            raise StageError(f"vcpus={self.nr_vcpus} exceeds the maximum KVM supports here "
                             f"({maximum}); QEMU stops there too")
        record.notes.append(f"vCPUs: recommended {recommended}, maximum {maximum}"
                            + (f"; {self.nr_vcpus} exceeds the recommendation (QEMU warns)"
                               if self.nr_vcpus > recommended else ""))
        missing = [cap.name for cap in REQUIRED_CAPS if not kvm.check_extension(cap)]
        if missing:
            raise StageError(f"this kernel lacks {', '.join(missing)}, which QEMU requires")
        record.notes.append("left out here: the KVM_CHECK_EXTENSIONs QEMU makes before "
                            "KVM_CREATE_VM (IMMEDIATE_EXIT, NR_MEMSLOTS, MULTI_ADDRESS_SPACE) "
                            "and the twenty or so optional ones after the required ones")
        record.notes.append(self.backend.describe())
        # kvm_arch_init: the MSR lists (kvm_get_supported_msrs, kvm_get_supported_feature_msrs)
        self._msr_indices = kvm.get_msr_index_list()
        self._feature_msr_indices = (kvm.get_msr_feature_index_list()
                                     if kvm.check_extension(Cap.GET_MSR_FEATURES) else [])
        record.notes.append(
            f"kvm_arch_init: KVM saves and restores {len(self._msr_indices)} MSRs per vCPU "
            f"(what QEMU migrates); {len(self._feature_msr_indices)} feature MSRs describe "
            f"the host CPU on /dev/kvm")
        identity_map = LEGACY_IDENTITY_MAP_ADDR
        if kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            identity_map = IDENTITY_MAP_ADDR
            self.vm.set_identity_map_addr(identity_map)
        self.vm.set_tss_addr(identity_map + 0x1000)   # the TSS right above the identity map
        if self.irqchip:
            self.vm.create_irqchip()
            record.notes.append("in-kernel irqchip (PIC, IOAPIC, LAPIC) created "
                                "(kvm_irqchip_create): HLT now waits in the kernel; the PIT "
                                "comes later, with the board's devices (pc_memory_init)")

    # -- 2. x86_cpu_realizefn ----------------------------------------------------------------------
    def x86_cpu_realizefn(self) -> StageRecord:
        """Build the CPU model's CPUID table in userspace."""
        def body(record: StageRecord) -> None:
            host = self.accel.get_supported_cpuid()
            self.cpuid = CpuidTable.for_model(self.cpu_model, host)
            changed = self.cpuid.diff_host()
            record.notes.append(
                f"CPU model {self.cpu_model}: {len(self.cpuid.entries)} CPUID entries, vendor "
                f"{self.cpuid.vendor}, {len(self.cpuid.features())} named features"
                + (f"; {len(changed)} registers masked from the host's" if changed else ""))
            if not self._kvm():
                record.actions.append("the CPUID table comes from the software accelerator's "
                                      "own model (no KVM_GET_SUPPORTED_CPUID)")
            record.notes.append(f"backend {self.backend.label}: " + (
                "the guest's CPUID instruction (and KVM_GET_CPUID2) returns the host's raw "
                "bits for most of leaves 1 and 7, whatever this table says; the bits KVM "
                "emulates (x2apic, hypervisor, ...) and the other leaves follow it"
                if not self.backend.cpuid_follows_table else
                "the software CPU's CPUID instruction answers every leaf from this table"
                if not self._kvm() else
                "the guest's CPUID instruction answers from this table once it is set, except "
                "the fields KVM keeps up to date itself (OSXSAVE, the APIC bit, leaf 0xd's "
                "XSAVE sizes)") + " (see lab.guest_cpuid())")
        return self._stage("x86_cpu_realizefn", body)

    # -- 3. kvm_init_vcpu ----------------------------------------------------------------------------
    def kvm_init_vcpu(self) -> StageRecord:
        """KVM_CREATE_VCPU and the kvm_run mapping, for every vCPU."""
        def body(record: StageRecord) -> None:
            for i in range(self.nr_vcpus):
                vcpu = self.vm.create_vcpu(i)
                log = ExitLog()
                self.vcpus.append(vcpu)
                self.exit_logs.append(log)
                self.runners.append(self.machine.add_vcpu(vcpu, log=log))
                self.registers.append(RegisterModel(i))
                if self._kvm():
                    record.actions.append(f"mmap(vcpu{i} fd {vcpu.fd}, {vcpu.mmap_size}, "
                                          f"MAP_SHARED) = struct kvm_run *")
                else:
                    record.actions.append(f"vCPU {i}: a Unicorn engine context in place of "
                                          f"KVM_CREATE_VCPU; no kvm_run to map")
            if self._kvm():
                record.notes.append(f"struct kvm_run mapping: {self.vcpus[0].mmap_size} bytes "
                                    f"per vCPU (kvm_run, the PIO data page, the coalesced MMIO "
                                    f"ring)")
            if self.nr_vcpus > 1:
                record.notes.append(f"{self.nr_vcpus} vCPUs: each runs in its own thread when "
                                    f"the guest runs, as QEMU's 'CPU n/KVM' threads")
        return self._stage("kvm_init_vcpu", body)

    # -- 4. kvm_arch_init_vcpu -------------------------------------------------------------------------
    def kvm_arch_init_vcpu(self) -> StageRecord:
        """TSC frequency, KVM_SET_CPUID2, feature MSRs."""
        def body(record: StageRecord) -> None:
            if self._kvm():
                wanted = [m for m in FEATURE_MSRS_TO_SET if m in self._feature_msr_indices]
                feature_values = self.accel.kvm.get_msrs(wanted) if wanted else {}
            for vcpu in self.vcpus:
                if self._kvm():
                    khz = vcpu.get_tsc_khz()
                    record.notes.append(f"vcpu{vcpu.id}: TSC {khz / 1000:.1f} MHz")
                vcpu.set_cpuid2(self.cpuid.entries)
                if self._kvm() and feature_values:
                    vcpu.set_msrs(feature_values)
            self.cpuid.frozen = True
            self.cpuid.notify(frozen=True)
            if self._kvm():
                record.notes.append(
                    "feature MSRs set (kvm_init_msrs): "
                    + (", ".join(f"{FEATURE_MSRS_TO_SET[m]}={v:#x}" for m, v in feature_values.items())
                       or "none offered")
                    + "; vlab reads their values from /dev/kvm here, where QEMU 5.0 reads "
                      "IA32_ARCH_CAPABILITIES while realizing the CPU model (an MSR feature "
                      "word) and takes IA32_UCODE_REV from the model's ucode-rev")
            else:
                record.actions.append("CPUID table kept by the software vCPU: its CPUID "
                                      "instruction answers from it, every leaf")
        return self._stage("kvm_arch_init_vcpu", body)

    # -- 5. pc_memory_init ----------------------------------------------------------------------------
    def pc_memory_init(self) -> StageRecord:
        """Guest RAM into memory slots, the guest loaded, the board's devices."""
        def body(record: StageRecord) -> None:
            regions = self.machine.init_memory(log_dirty=self._kvm())
            for region in regions:
                record.notes.append(f"{region.name}: {region.gpa:#x}-{region.end - 1:#x} "
                                    f"{region.kind}" + (f" slot {region.slot}" if region.slot is not None else " (hole: exits to userspace)"))
            if self.guest is None:
                self.load_example()
            self._write_guest()
            record.notes.append(f"guest {self.guest.name}: {len(self.guest.code)} bytes at "
                                f"{self.guest.load_address:#x}, entry {self.guest.entry:#x}")
            devices = self.machine.add_standard_devices(self.nr_vcpus)
            if self.irqchip and self._kvm():
                self.vm.create_pit2()
                record.notes.append("in-kernel i8254 PIT created (pc_basic_device_init -> "
                                    "kvm_pit_realizefn): board init, after the RAM slots")
            record.notes.append("devices: " + ", ".join(
                f"{name}" for name in devices) + " (pc_basic_device_init's COM1, debug ports, fw_cfg)")
            if not self._kvm():
                record.actions.append("uc_mem_map_ptr() of the same host memory in place of "
                                      "KVM_SET_USER_MEMORY_REGION")
        return self._stage("pc_memory_init", body)

    # -- 6. kvm_arch_put_registers -------------------------------------------------------------------
    def kvm_arch_put_registers(self) -> StageRecord:
        """The reset state of the chosen CPU mode, into every vCPU."""
        def body(record: StageRecord) -> None:
            if self.mode is CpuMode.LONG and not self.cpuid.has("lm"):
                raise StageError(
                    "this CPU model has no lm (CPUID 0x80000001 EDX bit 29 is clear), so the "
                    "vCPU cannot be reset into long mode. KVM would not stop it: it takes the "
                    "VMM's KVM_SET_SREGS as given and checks CPUID only when the guest itself "
                    "sets EFER.LME with WRMSR, which then raises #GP. Create a Lab with "
                    "mode='protected' and let the guest try.")
            for i, vcpu in enumerate(self.vcpus):
                setup = self.machine.setup_cpu(vcpu, self.mode, self.guest.entry,
                                               stack=GUEST_ORG - 0x200 * i, rbx=i)
                if i == 0:
                    record.notes.append(setup.description)
                    record.notes += [f"wrote {what} at {gpa:#x} ({length} bytes)"
                                     for gpa, length, what in setup.writes]
                self.registers[i].refresh(vcpu)
            if self.nr_vcpus > 1:
                record.notes.append("each vCPU starts at the same entry with RBX = its index")
            if not self._kvm():
                record.actions.append("uc_reg_write() of the segments, control registers, "
                                      "EFER, GDTR and IDTR in place of KVM_SET_SREGS, and of "
                                      "the general-purpose registers in place of KVM_SET_REGS; "
                                      "translated code flushed (uc_ctl_flush_tb)")
            if self.mode is CpuMode.PAGED and not self.backend.runs_32bit_paging:
                record.notes.append(f"this {self.backend.label} host does not run 32-bit paging: the guest "
                                    "will stop with SHUTDOWN at its first instruction")
        return self._stage("kvm_arch_put_registers", body)

    # -- guests -------------------------------------------------------------------------------------
    def load_example(self, name: str | None = None) -> Guest:
        """One of the shipped self-checking guests (default: the one for this Lab's mode)."""
        example = EXAMPLES[name or self.mode.value]
        if example.mode != self.mode.value and CpuMode(example.mode) is not self.mode:
            raise ValueError(f"example {example.name!r} needs mode {example.mode!r}; "
                             f"this Lab is in {self.mode.value!r}")
        return self.load_assembly(example.source(), org=example.org, name=f"example {example.name}")

    def load_assembly(self, source: str, org: int = GUEST_ORG, name: str = "assembly") -> Guest:
        """Assemble `source` with nasm for this Lab's mode and load it at `org`."""
        assembly = assemble(source, bits=self.mode.bits, org=org)
        self.guest = Guest(name, assembly.code, org, org, source, assembly)
        self._write_guest_if_ready()
        return self.guest

    def load_elf(self, image) -> Guest:
        """An ELF executable: its PT_LOAD segments at their physical addresses."""
        data = read_image(image)
        self.guest = Guest("elf", data, 0, 0)
        self._write_guest_if_ready()
        return self.guest

    def _write_guest_if_ready(self) -> None:
        if "memory" in self.provided:
            self._write_guest()

    def _write_guest(self) -> None:
        guest = self.guest
        if guest.name == "elf":
            loaded = load_elf(self.machine.memory, guest.code)
            guest.entry = loaded.entry
            guest.load_address = loaded.segments[0][0] if loaded.segments else 0
        else:
            self.machine.memory.write(guest.load_address, guest.code)

    # -- 7. kvm_cpu_exec ------------------------------------------------------------------------------
    def kvm_cpu_exec(self, **run_options) -> StageRecord:
        """Run the guest (the first `run()`), recording the loop's ioctls."""
        result = []

        def body(record: StageRecord) -> None:
            before = [runner.kernel_counters() for runner in self.runners]
            result.append(self._run(**run_options))
            if not self._kvm():
                starts = sum(runner.kernel_counters().get("emu_starts", 0) - b.get("emu_starts", 0)
                             for runner, b in zip(self.runners, before))
                record.actions.append(
                    f"uc_emu_start() {starts} times in place of KVM_RUN: Unicorn translated and "
                    f"ran the guest's code; port I/O reached the devices from inside the "
                    f"instruction's hook (QEMU's TCG: cpu_outb/cpu_inb), and only MMIO, a HLT "
                    f"or a stop condition stopped emulation (uc_emu_stop) to return an exit")

        record = self._stage("kvm_cpu_exec", body, ioctl_limit=RUN_RECORD_LIMIT)
        record.notes.append(str(result[0]) if not isinstance(result[0], list)
                            else "; ".join(f"vcpu{i}: {r}" for i, r in enumerate(result[0])))
        return record

    def run(self, vcpu: int | None = None, **options) -> RunResult | list[RunResult]:
        """Run until the guest stops (HLT, fatal exit, breakpoint) or `until`, `predicate`,
        `max_exits`, `timeout` says so; Ctrl-C / the stop button stops it cleanly. With
        several vCPUs and no `vcpu`, each runs in its own thread."""
        if "kvm_cpu_exec" not in self.records:
            self.kvm_cpu_exec(vcpu=vcpu, **options)
            return self.last_run
        return self._run(vcpu=vcpu, **options)

    def _run(self, vcpu: int | None = None, **options):
        self._check_ready()
        self._forget_history()
        if vcpu is not None or self.nr_vcpus == 1:
            index = vcpu or 0
            result = self.runners[index].run(**options)
            self._explain_lme_refused(index, result)
            self.registers[index].refresh(self.vcpus[index])
        else:
            result = self._run_threads(options)
        self.last_run = result
        self.notify(event="run")
        return result

    def _run_threads(self, options) -> list[RunResult]:
        results: list = [None] * self.nr_vcpus
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                results[i] = self.runners[i].run(**options)
            except BaseException as e:  # raised in the caller's thread once all have stopped
                errors.append(e)
                self.stop(f"vCPU {i} failed: {e}")

        threads = [threading.Thread(target=worker, args=(i,), name=f"CPU {i}/{self.accel.name.upper()}")
                   for i in range(self.nr_vcpus)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            self.stop("interrupted by Ctrl-C")
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        for i, vcpu in enumerate(self.vcpus):
            self._explain_lme_refused(i, results[i])
            self.registers[i].refresh(vcpu)
        return results

    def _explain_lme_refused(self, index: int, result: RunResult) -> None:
        """A SHUTDOWN at a WRMSR setting EFER.LME on a CPU model without lm: KVM refused the
        write with #GP, which escalated. The stop reason says so."""
        if result.last_exit.__class__ is not Shutdown or self.cpuid.has("lm"):
            return
        regs, sregs = self.vcpus[index].get_regs(), self.vcpus[index].get_sregs()
        try:
            code = self.machine.memory.read(sregs.cs.base + regs.rip, len(WRMSR))
        except ValueError:
            return
        if code != WRMSR or regs.rcx & 0xFFFFFFFF != MSR_EFER or not regs.rax & EFER_LME:
            return
        why = (f"the guest's WRMSR at {regs.rip:#x} sets EFER.LME, but this CPU model has no lm "
               f"(CPUID 0x80000001 EDX bit 29 is clear): KVM refused the write with #GP "
               f"(kvm_valid_efer, arch/x86/kvm/x86.c), so the guest cannot enter long mode; "
               f"with no usable IDT the #GP became this triple fault")
        result.stop_reason = f"SHUTDOWN: {why}"

    def stop(self, cause: str = "stopped") -> None:
        """Stop every running vCPU (from any thread)."""
        for runner in self.runners:
            runner.stop(cause)

    def _check_ready(self) -> None:
        if "registers" not in self.provided:
            missing = [s.name for s in STAGES[:-1] if s.name not in self.records]
            raise StageError(f"the guest cannot run yet: do {', '.join(missing)} first "
                             f"(lab.bring_up() does them all)")

    # -- stepping ----------------------------------------------------------------------------------
    def step(self, vcpu: int = 0) -> StepResult:
        """Execute one instruction and show what changed (undo with `step_back()`)."""
        self._check_ready()
        entry = self._history_entry(vcpu)
        result = self.runners[vcpu].step()
        self._history.append((entry, self._dirty_page_undo()))
        self.registers[vcpu].update(result.after)
        self.notify(event="step")
        return result

    def break_at(self, *addresses: int, vcpu: int = 0) -> None:
        """Hardware breakpoints (up to four) at guest linear addresses; none clears them."""
        self._check_ready()
        self.runners[vcpu].set_breakpoints(addresses)

    def _history_entry(self, vcpu: int) -> tuple[int, VcpuState]:
        if self._shadow is None:
            self._shadow = bytearray(self._ram().view)
            self._dirty_pages()  # start a fresh dirty log
        return vcpu, VcpuState.capture(self.vcpus[vcpu])

    def _ram(self):
        return next(r for r in self.machine.memory.regions if r.slot is not None)

    def _dirty_pages(self) -> list[int]:
        """Pages of RAM written since the last call: KVM's dirty log, or, on an accelerator
        without one (tcg), the pages that differ from the shadow copy."""
        ram = self._ram()
        log = getattr(self.vm, "dirty_pages", None)
        if log is not None:
            return log(ram)
        view, shadow = ram.view, self._shadow
        return [ram.gpa + offset for offset in range(0, ram.size, PAGE_SIZE)
                if view[offset:offset + PAGE_SIZE].tobytes() != shadow[offset:offset + PAGE_SIZE]]

    def _dirty_page_undo(self) -> dict[int, bytes]:
        """The previous contents of the pages the step wrote, from the shadow copy."""
        ram = self._ram()
        undo = {}
        for gpa in self._dirty_pages():
            offset = gpa - ram.gpa
            undo[gpa] = bytes(self._shadow[offset:offset + PAGE_SIZE])
            self._shadow[offset:offset + PAGE_SIZE] = ram.view[offset:offset + PAGE_SIZE]
        return undo

    def step_back(self) -> RegisterSnapshot:
        """Undo the last `step()`: registers and the memory it wrote."""
        if not self._history:
            raise StageError("nothing to step back: no step() since the last run() or restore()")
        (vcpu, state), undo = self._history.pop()
        state.restore(self.vcpus[vcpu])
        if undo:
            ram = self._ram()
            for gpa, page in undo.items():
                offset = gpa - ram.gpa
                ram.view[offset:offset + PAGE_SIZE] = page
                self._shadow[offset:offset + PAGE_SIZE] = page
        self.runners[vcpu].halted = False
        snapshot = RegisterSnapshot.capture(self.vcpus[vcpu])
        self.registers[vcpu].update(snapshot)
        self.notify(event="step_back")
        return snapshot

    def _forget_history(self) -> None:
        self._history.clear()
        self._shadow = None

    # -- snapshot / restore ----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Save every vCPU's state and guest memory."""
        self._check_ready()
        return Snapshot([VcpuState.capture(v, self._msr_indices) for v in self.vcpus],
                        self.machine.memory.snapshot(),
                        sum(log.total for log in self.exit_logs))

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM back exactly as `snapshot` found it (registers and memory). IA32_TSC is
        written back too, but KVM may take that as a TSC synchronisation and keep counting."""
        self.machine.memory.restore(snapshot.memory)
        for vcpu, state in zip(self.vcpus, snapshot.vcpus):
            state.restore(vcpu)
        for runner in self.runners:
            runner.halted = False
        self._forget_history()
        for model, vcpu in zip(self.registers, self.vcpus):
            model.refresh(vcpu)
        self.notify(event="restore")

    # -- what the guest sees ----------------------------------------------------------------------
    def guest_cpuid(self, leaf: int, subleaf: int = 0) -> dict[str, int]:
        """What the guest's CPUID instruction returns for this Lab's table, measured by
        running it in a throwaway VM on the same accelerator (the table says one thing; on
        some backends the hardware answers another)."""
        from .probe import probe_cpuid
        if self.cpuid is None:
            raise StageError("no CPU model yet: call lab.x86_cpu_realizefn() first")
        return probe_cpuid(self.accel, self.cpuid.entries, [(leaf, subleaf)])[0]

    # -- conveniences ------------------------------------------------------------------------------
    @property
    def console(self) -> str:
        return self.machine.console.text if self.machine else ""

    def exits(self, vcpu: int = 0) -> ExitLog:
        return self.exit_logs[vcpu]

    def memory(self, gpa: int, size: int) -> bytes:
        return self.machine.memory.read(gpa, size)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if self.accel is not None:
            self.accel.close()
            self.accel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __str__(self) -> str:
        lines = [f"vlab.Lab(accel={self.accel_choice!r}, memory={self.memory_size >> 20}M, "
                 f"cpu={self.cpu_model!r}, vcpus={self.nr_vcpus}, mode={self.mode.value!r})"]
        for row in self.stages:
            mark = {"done": "x", "next": ">", "waiting": " "}[row["status"]]
            lines.append(f"  [{mark}] {row['stage']:<24} {row['title']}")
        return "\n".join(lines)

    __repr__ = __str__
