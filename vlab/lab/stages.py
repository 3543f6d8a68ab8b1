"""QEMU's bring-up of a KVM guest, as named stages with what each needs and provides.

The order is QEMU's (`qemu_init` → `configure_accelerators` → `machine_run_board_init` →
`pc_init1`): the accelerator first, then `x86_cpus_init` realizes the CPUs (and their
threads create the vCPUs) *before* `pc_memory_init` maps RAM. Each stage names the QEMU
function it mirrors today and in QEMU 5.0 (the seed document's version), the source file,
and the kernel handler its ioctls reach.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str                 # the QEMU function, also the Lab method
    title: str
    qemu_file: str            # where it lives in today's QEMU
    qemu50: str               # its name and file in QEMU 5.0, where they differ
    kernel: str               # the KVM handler its ioctls reach
    needs: tuple[str, ...]
    provides: tuple[str, ...]
    summary: str
    qom: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("kvm_init", "accelerator init", "accel/kvm/kvm-all.c", "same (accel/kvm/kvm-all.c)",
          "kvm_dev_ioctl -> kvm_dev_ioctl_create_vm (virt/kvm/kvm_main.c)",
          (), ("kvm", "vm"),
          "open /dev/kvm, KVM_GET_API_VERSION, KVM_CREATE_VM, then the vCPU limits and the "
          "capabilities QEMU 5.0 requires, kvm_arch_init (the MSR lists, the identity-map and "
          "TSS pages), and the in-kernel irqchip (kvm_irqchip_create) when asked",
          ("type_init(kvm_type_init) registered TYPE_KVM_ACCEL ('kvm-accel', parent "
           "TYPE_ACCEL) before main() ran",
           "configure_accelerators -> do_configure_accelerator -> accel_init_machine",
           "object_new(kvm-accel): class_init (kvm_accel_class_init) runs on first use of the "
           "class, then instance_init (kvm_accel_instance_init) on a KVMState-sized object",
           "acc->init_machine == kvm_init")),
    Stage("x86_cpu_realizefn", "CPU realize", "target/i386/cpu.c", "same (target/i386/cpu.c)",
          "kvm_dev_ioctl -> kvm_dev_ioctl_get_cpuid (arch/x86/kvm/cpuid.c)",
          ("kvm",), ("cpu_model",),
          "build the CPU model's CPUID table in userspace: -cpu host takes "
          "KVM_GET_SUPPORTED_CPUID, a named model masks it; features can still be edited",
          ("x86_cpus_init -> x86_cpu_new -> object_new(TYPE_X86_CPU): parent classes "
           "initialise before children (DeviceState -> CPUState -> X86CPU), class_init before "
           "instance_init",
           "x86_cpu_common_class_init set DeviceClass.realize = x86_cpu_realizefn",
           "object_property_set_bool('realized') -> device_set_realized -> x86_cpu_realizefn",
           "x86_cpu_realizefn -> qemu_init_vcpu -> one thread per vCPU (CPU n/KVM)")),
    Stage("kvm_init_vcpu", "vCPU create", "accel/kvm/kvm-all.c (from kvm_vcpu_thread_fn)",
          "kvm_init_vcpu, called from qemu_kvm_cpu_thread_fn in cpus.c",
          "kvm_vm_ioctl_create_vcpu (virt/kvm/kvm_main.c); kvm_vcpu_mmap for kvm_run",
          ("vm", "cpu_model"), ("vcpus",),
          "KVM_CREATE_VCPU (kvm_get_vcpu), KVM_GET_VCPU_MMAP_SIZE, mmap of the vCPU fd: the "
          "struct kvm_run shared with the kernel"),
    Stage("kvm_arch_init_vcpu", "arch vCPU init", "target/i386/kvm/kvm.c",
          "kvm_arch_init_vcpu in target/i386/kvm.c",
          "kvm_vcpu_ioctl_set_cpuid2 (arch/x86/kvm/cpuid.c), kvm_arch_vcpu_ioctl (x86.c)",
          ("vcpus", "cpu_model"), ("cpuid_set",),
          "TSC frequency (KVM_GET_TSC_KHZ), KVM_SET_CPUID2 with the model's table, and the "
          "feature MSRs (kvm_init_msrs)"),
    Stage("pc_memory_init", "memory and board devices", "hw/i386/pc.c", "same (hw/i386/pc.c)",
          "kvm_vm_ioctl_set_memory_region -> kvm_set_memory_region (virt/kvm/kvm_main.c)",
          ("vm", "vcpus"), ("memory", "devices", "guest"),
          "guest RAM mapped with KVM_SET_USER_MEMORY_REGION slot by slot, the guest loaded, "
          "then pc_basic_device_init's devices: COM1, isa-debugcon, isa-debug-exit, fw_cfg, "
          "and with the in-kernel irqchip the PIT (KVM_CREATE_PIT2) (QEMU realizes the CPUs "
          "before it maps RAM, so vCPUs exist first)"),
    Stage("kvm_arch_put_registers", "reset: initial registers", "target/i386/kvm/kvm.c",
          "kvm_arch_put_registers in target/i386/kvm.c",
          "kvm_arch_vcpu_ioctl_set_regs / set_sregs (arch/x86/kvm/x86.c)",
          ("vcpus", "cpuid_set", "memory", "guest"), ("registers",),
          "the reset state for the chosen CPU mode: KVM_SET_SREGS (segments, GDT, CR0/CR3/CR4, "
          "EFER) and KVM_SET_REGS (RIP at the guest's entry, RSP, RFLAGS)"),
    Stage("kvm_cpu_exec", "the KVM_RUN loop", "accel/kvm/kvm-all.c", "same (accel/kvm/kvm-all.c)",
          "kvm_arch_vcpu_ioctl_run -> vcpu_run -> vcpu_enter_guest (arch/x86/kvm/x86.c)",
          ("registers",), ("ran",),
          "KVM_RUN until the guest needs userspace, handle the exit (kvm_handle_io, MMIO, "
          "HLT, shutdown...), loop"),
)

STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


class StageError(RuntimeError):
    """A stage was called before what it needs exists."""
