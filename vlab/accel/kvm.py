"""The kvm accelerator: `vlab.kvm` behind the accelerator interface (QEMU's `kvm-accel`)."""
from __future__ import annotations

from ..kvm import Kvm, VmFd
from ..kvm.backend import detect as detect_backend
from .base import Capabilities
from ..x86 import PAGE_SIZE
from ..kvm.abi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY


class KvmVm:
    """A VM fd plus the memory-slot bookkeeping QEMU's `kvm_set_phys_mem` does."""

    def __init__(self, vm: VmFd):
        self.vm = vm

    def map_memory(self, region, log_dirty: bool = False) -> None:
        flags = (KVM_MEM_READONLY if region.readonly else 0) | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self.vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address,
                                       flags)

    def create_vcpu(self, vcpu_id: int = 0):
        return self.vm.create_vcpu(vcpu_id)

    def dirty_pages(self, region) -> list[int]:
        """Guest-physical addresses of the pages of `region` written since the last call."""
        bitmap = self.vm.get_dirty_log(region.slot, region.size)
        return [region.gpa + (i * 8 + b) * PAGE_SIZE for i, byte in enumerate(bitmap) if byte
                for b in range(8) if byte >> b & 1]

    def close(self) -> None:
        self.vm.close()


class KvmAccelerator:
    name = "kvm"
    capabilities = Capabilities(kernel=True, dirty_log=True, irqchip=True, inline_port_io=False,
                                vcpu_state=("fpu", "xcrs", "vcpu_events", "mp_state", "debugregs"))

    def __init__(self, reason: str = "asked for kvm", path: str | None = None, tracer=None):
        self.kvm = Kvm(path, tracer)
        self.reason = reason
        self.backend = detect_backend()   # the facts of the KVM module behind /dev/kvm

    def stage_actions(self, stage: str, **facts) -> list[str]:
        """The system calls of a stage that are not ioctls: opening /dev/kvm, mapping each
        vCPU's kvm_run."""
        if stage == "kvm_init":
            return [f"open('/dev/kvm', O_RDWR|O_CLOEXEC) = fd {self.kvm.fd}"]
        if stage == "kvm_init_vcpu":
            vcpu = facts["vcpu"]
            return [f"mmap(vcpu{vcpu.id} fd {vcpu.fd}, {vcpu.mmap_size}, MAP_SHARED) = "
                    f"struct kvm_run *"]
        return []

    def create_vm(self) -> KvmVm:
        return KvmVm(self.kvm.create_vm())

    def get_supported_cpuid(self):
        return self.kvm.get_supported_cpuid()

    def close(self) -> None:
        self.kvm.close()
