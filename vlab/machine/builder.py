"""One board builder, its steps named after the QEMU functions they mirror.

`vlab.Lab` runs these steps one stage at a time and records each; the command line, the
multiboot PC, the CPUID probe and the tests call the same steps through `build_board`,
unrecorded. QEMU's order (pc_init1): the accelerator (`kvm_init` -> `kvm_arch_init`,
`kvm_irqchip_create`), the vCPUs (`x86_cpus_init`: each realized with `kvm_init_vcpu` and
`kvm_arch_init_vcpu`), RAM (`pc_memory_init`), then the devices (`pc_basic_device_init`).
"""
from __future__ import annotations

from ..kvm.abi import Cap, MpState
from .board import Machine
from .exitlog import ExitLog
from .runloop import VcpuRunner

# QEMU's kvm_arch_init: the identity-map page and, right above it, the three TSS pages that
# Intel's real-mode emulation (vm86) needs, just below the 4 GiB BIOS area.
IDENTITY_MAP_ADDR = 0xFEFFC000
# QEMU's identity-map base where KVM cannot move it (no KVM_CAP_SET_IDENTITY_MAP_ADDR).
LEGACY_IDENTITY_MAP_ADDR = 0xFFFBC000


def kvm_arch_init(accel, vm) -> int:
    """Place the identity map and the TSS (where KVM lets the VMM place the identity map);
    returns the identity map's address. Needs a kernel accelerator."""
    identity_map = LEGACY_IDENTITY_MAP_ADDR
    if accel.kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
        identity_map = IDENTITY_MAP_ADDR
        vm.vm.set_identity_map_addr(identity_map)
    vm.vm.set_tss_addr(identity_map + 0x1000)
    return identity_map


def kvm_irqchip_create(vm) -> None:
    """The two 8259 PICs, the IOAPIC and a local APIC per vCPU, in the kernel (accepted only
    before the first vCPU exists)."""
    vm.vm.create_irqchip()


def kvm_init_vcpu(machine: Machine, index: int, log: ExitLog | None = None) -> VcpuRunner:
    """KVM_CREATE_VCPU (and the kvm_run mapping): the vCPU with its runner, whose exits go
    to `log` (the machine's own by default)."""
    return machine.add_vcpu(machine.vm.create_vcpu(index), log=log)


def cpuid_for(table: list, apic_id: int) -> list:
    """A CPUID table with this vCPU's APIC ID where QEMU's `cpu_x86_cpuid` puts it: leaf 1
    EBX[31:24] (initial APIC ID), leaves 0xb and 0x1f EDX (x2APIC ID)."""
    out = []
    for entry in table:
        if entry.function == 1:
            entry = entry.replace(ebx=entry.ebx & 0x00FFFFFF | apic_id << 24)
        elif entry.function in (0xB, 0x1F):
            entry = entry.replace(edx=apic_id)
        out.append(entry)
    return out


def kvm_arch_init_vcpu(vcpu, cpuid: list) -> None:
    """KVM_SET_CPUID2 with the vCPU's own APIC ID."""
    vcpu.set_cpuid2(cpuid_for(cpuid, vcpu.id))


def x86_cpus_init(machine: Machine, cpuid: list, count: int, *, aps_wait: bool = False) -> None:
    """`count` vCPUs, realized in turn; with `aps_wait` (an in-kernel irqchip) every vCPU
    but the first waits for INIT/SIPI, as `kvm_arch_reset_vcpu` leaves application
    processors."""
    for index in range(count):
        # one log per vCPU thread when there are several: they share no counters
        runner = kvm_init_vcpu(machine, index, ExitLog() if count > 1 else None)
        kvm_arch_init_vcpu(runner.vcpu, cpuid)
        if aps_wait and index:
            runner.vcpu.set_mp_state(MpState.UNINITIALIZED)


def pc_memory_init(machine: Machine, *, log_dirty: bool = False) -> list:
    """RAM from guest-physical 0 into memory slots; `log_dirty` asks KVM to log the pages
    the guest writes (what `step_back()` undoes)."""
    return machine.init_memory(log_dirty=log_dirty)


def pc_basic_device_init(machine: Machine, nb_cpus: int, *, pit: bool = False) -> dict:
    """The in-kernel i8254 PIT when asked (QEMU: kvm_pit_realizefn), then COM1, the debug
    ports, fw_cfg and the MMIO test device."""
    if pit:
        machine.vm.vm.create_pit2()
    return machine.add_standard_devices(nb_cpus)


def build_board(accel, *, memory: int | str, smp: int = 1, irqchip: bool = False,
                cpuid: list | None = None) -> Machine:
    """Every step, in QEMU's order: a machine ready for a guest to be loaded."""
    vm = accel.create_vm()
    machine = Machine(accel, vm, ram_size=memory)
    try:
        if accel.capabilities.kernel:
            kvm_arch_init(accel, vm)
        if irqchip:
            kvm_irqchip_create(vm)
        x86_cpus_init(machine, accel.get_supported_cpuid() if cpuid is None else cpuid, smp,
                      aps_wait=irqchip)
        pc_memory_init(machine)
        pc_basic_device_init(machine, smp, pit=irqchip)
    except BaseException:
        machine.close()
        raise
    return machine
