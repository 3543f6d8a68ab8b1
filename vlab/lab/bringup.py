"""The bring-up steps behind `vlab.Lab`'s stages, one function per QEMU function: each does
what it names on the Lab's accelerator and writes what it did into the stage's record.

On kvm they issue QEMU's ioctls in QEMU 5.0's order; on tcg they say what the software
accelerator does in place of each one.
"""
from __future__ import annotations

from ..kvm import Cap, KernelTrace
from ..kvm.kernel_trace import KERNEL_TRACE_NEEDS_KVM
from ..machine import builder
from ..machine.board import Machine
from ..machine.cpu_modes import CpuMode
from ..machine.exitlog import ExitLog
from ..machine.history import StepHistory
from ..accel import select
from ..x86 import MSR_IA32_ARCH_CAPABILITIES, MSR_IA32_UCODE_REV
from .cpuid import CpuidTable
from .cpus import LabCpu
from .records import StageRecord
from .registers import RegisterModel
from .stages import StageError

# Capabilities QEMU 5.0 refuses to run without: kvm_required_capabilites (kvm-all.c), then
# x86's kvm_arch_required_capabilities (target/i386/kvm.c). QEMU 8.2 added INTERNAL_ERROR_DATA,
# IOEVENTFD, IOEVENTFD_ANY_LENGTH, and for x86 SIGNAL_MSI and IRQ_ROUTING.
REQUIRED_CAPS = (Cap.USER_MEMORY, Cap.DESTROY_MEMORY_REGION_WORKS, Cap.JOIN_MEMORY_REGIONS_WORKS,
                 Cap.SET_TSS_ADDR, Cap.EXT_CPUID, Cap.MP_STATE)
# MSRs kvm_init_msrs copies from KVM's feature MSRs into the vCPU.
FEATURE_MSRS_TO_SET = {MSR_IA32_ARCH_CAPABILITIES: "IA32_ARCH_CAPABILITIES",
                       MSR_IA32_UCODE_REV: "IA32_UCODE_REV"}
GUEST_ORG = 0x8000
VCPU_STACK = 0x200   # each vCPU's stack, stacked down from GUEST_ORG
MAX_VCPUS = GUEST_ORG // VCPU_STACK


def kvm_init(lab, record: StageRecord, choice: str, reason: str | None) -> None:
    """Open the accelerator `choice` and create the VM (QEMU: kvm_init, then kvm_arch_init)."""
    lab.accel = select(choice, tracer=lab.tracer)
    if reason:
        lab.accel.reason = reason
    record.notes.append(f"accelerator: {lab.accel.reason}")
    lab.backend = lab.accel.backend
    if lab.kernel_trace_requested:
        if not lab.accel.capabilities.kernel:
            raise StageError(f"{KERNEL_TRACE_NEEDS_KVM} ({lab.accel.reason})")
        lab.kernel_trace = KernelTrace()
        record.notes.append(f"kernel trace: KVM's tracepoints of this process, in the tracefs "
                            f"instance {lab.kernel_trace.name}")
    record.actions += lab.accel.stage_actions("kvm_init")
    if lab.accel.capabilities.kernel:
        _kvm_init(lab, record)
    else:
        record.notes.append(lab.backend.describe())
        lab.vm = lab.accel.create_vm()
    if lab.irqchip and not lab.accel.capabilities.irqchip:
        record.actions.append("irqchip=True not honoured: the software accelerator "
                              "has no interrupt controller, so HLT still exits to "
                              "userspace")
    lab.machine = Machine(lab.accel, lab.vm, ram_size=lab.memory_size)
    lab._history = StepHistory(lab.machine)


def _kvm_init(lab, record: StageRecord) -> None:
    """kvm_init's ioctls in QEMU 5.0's order: the API version, KVM_CREATE_VM, the vCPU
    limits and required capabilities, then kvm_arch_init and kvm_irqchip_create."""
    kvm = lab.accel.kvm
    version = kvm.get_api_version()
    if version != 12:
        raise StageError(f"KVM_GET_API_VERSION returned {version}; QEMU and vlab need 12")
    lab.vm = lab.accel.create_vm()
    # kvm_recommended_vcpus asks the VM fd, kvm_max_vcpus /dev/kvm; 0 means "not said"
    recommended = lab.vm.vm.check_extension(Cap.NR_VCPUS) or 4
    maximum = kvm.check_extension(Cap.MAX_VCPUS) or recommended
    if lab.nr_vcpus > maximum:
        raise StageError(f"vcpus={lab.nr_vcpus} exceeds the maximum KVM supports here "
                         f"({maximum}); QEMU stops there too")
    record.notes.append(f"vCPUs: recommended {recommended}, maximum {maximum}"
                        + (f"; {lab.nr_vcpus} exceeds the recommendation (QEMU warns)"
                           if lab.nr_vcpus > recommended else ""))
    missing = [cap.name for cap in REQUIRED_CAPS if not kvm.check_extension(cap)]
    if missing:
        raise StageError(f"this kernel lacks {', '.join(missing)}, which QEMU requires")
    record.notes.append("left out here: the KVM_CHECK_EXTENSIONs QEMU makes before "
                        "KVM_CREATE_VM (IMMEDIATE_EXIT, NR_MEMSLOTS, MULTI_ADDRESS_SPACE) "
                        "and the twenty or so optional ones after the required ones")
    record.notes.append(lab.backend.describe())
    # kvm_arch_init: the MSR lists (kvm_get_supported_msrs, kvm_get_supported_feature_msrs)
    lab._msr_indices = kvm.get_msr_index_list()
    lab._feature_msr_indices = (kvm.get_msr_feature_index_list()
                                 if kvm.check_extension(Cap.GET_MSR_FEATURES) else [])
    record.notes.append(
        f"kvm_arch_init: KVM saves and restores {len(lab._msr_indices)} MSRs per vCPU "
        f"(what QEMU migrates); {len(lab._feature_msr_indices)} feature MSRs describe "
        f"the host CPU on /dev/kvm")
    builder.kvm_arch_init(lab.accel, lab.vm)   # the identity map, the TSS right above it
    if lab.irqchip:
        builder.kvm_irqchip_create(lab.vm)
        record.notes.append("in-kernel irqchip (PIC, IOAPIC, LAPIC) created "
                            "(kvm_irqchip_create): HLT now waits in the kernel; the PIT "
                            "comes later, with the board's devices (pc_memory_init)")


def x86_cpu_realizefn(lab, record: StageRecord) -> None:
    """Build the CPU model's CPUID table in userspace."""
    host = lab.accel.get_supported_cpuid()
    lab.cpuid = CpuidTable.for_model(lab.cpu_model, host)
    changed = lab.cpuid.diff_host()
    record.notes.append(
        f"CPU model {lab.cpu_model}: {len(lab.cpuid.entries)} CPUID entries, vendor "
        f"{lab.cpuid.vendor}, {len(lab.cpuid.features())} named features"
        + (f"; {len(changed)} registers masked from the host's" if changed else ""))
    record.actions += lab.accel.stage_actions("x86_cpu_realizefn")
    record.notes.append(f"backend {lab.backend.label}: {lab.backend.guest_cpuid} "
                        f"(see lab.guest_cpuid())")


def kvm_init_vcpu(lab, record: StageRecord) -> None:
    """KVM_CREATE_VCPU and the kvm_run mapping, for every vCPU."""
    if lab.nr_vcpus > MAX_VCPUS:
        raise StageError(f"vcpus={lab.nr_vcpus}: each vCPU starts with its own {VCPU_STACK}-byte "
                         f"stack below the guest at {GUEST_ORG:#x}, so a Lab has at most "
                         f"{MAX_VCPUS}")
    for i in range(lab.nr_vcpus):
        log = ExitLog()
        runner = builder.kvm_init_vcpu(lab.machine, i, log)
        runner.kernel_trace = lab.kernel_trace
        vcpu = runner.vcpu
        lab.cpus.append(LabCpu(vcpu, runner, RegisterModel(i), log))
        record.actions += lab.accel.stage_actions("kvm_init_vcpu", vcpu=vcpu)
    if lab.accel.capabilities.kernel:
        record.notes.append(f"struct kvm_run mapping: {lab.vcpus[0].mmap_size} bytes "
                            f"per vCPU (kvm_run, the PIO data page, the coalesced MMIO "
                            f"ring)")
    if lab.nr_vcpus > 1:
        record.notes.append(f"{lab.nr_vcpus} vCPUs: each runs in its own thread when "
                            f"the guest runs, as QEMU's 'CPU n/KVM' threads")


def kvm_arch_init_vcpu(lab, record: StageRecord) -> None:
    """TSC frequency, KVM_SET_CPUID2, feature MSRs."""
    kernel = lab.accel.capabilities.kernel
    wanted = [m for m in FEATURE_MSRS_TO_SET if m in lab._feature_msr_indices]
    feature_values = lab.accel.kvm.get_msrs(wanted) if kernel and wanted else {}
    for vcpu in lab.vcpus:
        if kernel:
            khz = vcpu.get_tsc_khz()
            record.notes.append(f"vcpu{vcpu.id}: TSC {khz / 1000:.1f} MHz")
        vcpu.set_cpuid2(lab.cpuid.entries)
        if feature_values:
            vcpu.set_msrs(feature_values)
    lab.cpuid.frozen = True
    lab.cpuid.notify(frozen=True)
    record.actions += lab.accel.stage_actions("kvm_arch_init_vcpu")
    if kernel:
        record.notes.append(
            "feature MSRs set (kvm_init_msrs): "
            + (", ".join(f"{FEATURE_MSRS_TO_SET[m]}={v:#x}" for m, v in feature_values.items())
               or "none offered")
            + "; vlab reads their values from /dev/kvm here, where QEMU 5.0 reads "
              "IA32_ARCH_CAPABILITIES while realizing the CPU model (an MSR feature "
              "word) and takes IA32_UCODE_REV from the model's ucode-rev")


def pc_memory_init(lab, record: StageRecord) -> None:
    """Guest RAM into memory slots, the guest loaded, the board's devices."""
    regions = builder.pc_memory_init(lab.machine, log_dirty=lab.accel.capabilities.dirty_log)
    for region in regions:
        record.notes.append(f"{region.name}: {region.gpa:#x}-{region.end - 1:#x} "
                            f"{region.kind}" + (f" slot {region.slot}" if region.slot is not None else " (hole: exits to userspace)"))
    if lab.guest is None:
        lab.load_example()
    lab._write_guest()
    record.notes.append(f"guest {lab.guest.name}: {len(lab.guest.code)} bytes at "
                        f"{lab.guest.load_address:#x}, entry {lab.guest.entry:#x}")
    pit = lab.irqchip and lab.accel.capabilities.irqchip
    devices = builder.pc_basic_device_init(lab.machine, lab.nr_vcpus, pit=pit)
    if pit:
        record.notes.append("in-kernel i8254 PIT created (pc_basic_device_init -> "
                            "kvm_pit_realizefn): board init, after the RAM slots")
    record.notes.append("devices: " + ", ".join(
        f"{name}" for name in devices) + " (pc_basic_device_init's COM1, debug ports, fw_cfg)")
    if lab.guest.linux is not None:   # what QEMU's pc has besides, and Linux uses
        from ..machine.pc import add_linux_devices, add_pc_devices
        standard = set(devices)
        add_pc_devices(lab.machine)
        add_linux_devices(lab.machine)
        record.notes.append("devices for Linux (vlab.machine.pc's add_pc_devices and "
                            "add_linux_devices): "
                            + ", ".join(sorted(set(lab.machine.devices) - standard)))
    record.actions += lab.accel.stage_actions("pc_memory_init")


def kvm_arch_put_registers(lab, record: StageRecord) -> None:
    """The reset state of the chosen CPU mode, into every vCPU."""
    if lab.mode is CpuMode.LONG and not lab.cpuid.has("lm"):
        raise StageError(
            "this CPU model has no lm (CPUID 0x80000001 EDX bit 29 is clear), so the "
            "vCPU cannot be reset into long mode. KVM would not stop it: it takes the "
            "VMM's KVM_SET_SREGS as given and checks CPUID only when the guest itself "
            "sets EFER.LME with WRMSR, which then raises #GP. Create a Lab with "
            "mode='protected' and let the guest try.")
    if lab.guest.boot is not None:   # Linux: the boot protocol's entry, not the mode's
        from ..machine.linux import enter_linux
        writes = enter_linux(lab.vcpus[0], lab.machine.memory, lab.guest.boot)
        record.notes += lab.guest.boot.summary().splitlines()
        record.notes += [f"wrote {what} at {gpa:#x} ({length} bytes)" for gpa, length, what in writes]
        lab.registers[0].refresh(lab.vcpus[0])
        record.actions += lab.accel.stage_actions("kvm_arch_put_registers")
        return
    for i, vcpu in enumerate(lab.vcpus):
        setup = lab.machine.setup_cpu(vcpu, lab.mode, lab.guest.entry,
                                       stack=GUEST_ORG - VCPU_STACK * i, rbx=i)
        if i == 0:
            record.notes.append(setup.description)
            record.notes += [f"wrote {what} at {gpa:#x} ({length} bytes)"
                             for gpa, length, what in setup.writes]
        lab.registers[i].refresh(vcpu)
    if lab.nr_vcpus > 1:
        record.notes.append("each vCPU starts at the same entry with RBX = its index")
    record.actions += lab.accel.stage_actions("kvm_arch_put_registers")
    if lab.mode is CpuMode.PAGED and not lab.backend.runs_32bit_paging:
        record.notes.append(f"this {lab.backend.label} host does not run 32-bit paging: the guest "
                            "will stop with SHUTDOWN at its first instruction")
