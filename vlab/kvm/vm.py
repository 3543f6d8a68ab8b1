"""The VM fd (`KVM_CREATE_VM`): memory slots, the in-kernel irqchip, and the factory of vCPUs."""
from __future__ import annotations

import weakref

from .abi import Cap, ffi, KVM_MEM_READONLY
from .stats import StatsFd
from .fd import KvmFd, close_fd
from .vcpu import VcpuFd
from ..x86 import PAGE_SIZE


class VmFd(KvmFd):
    """One virtual machine (QEMU's `KVMState.vmfd`)."""

    fd_kind = "vm"

    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.tracer = kvm.tracer
        self.fd = fd
        self.vcpus: list = []
        self._finalizer = weakref.finalize(self, close_fd, fd)

    def check_extension(self, cap: Cap | int) -> int:
        """Per-VM capability value (KVM_CAP_CHECK_EXTENSION_VM): may differ from /dev/kvm's.

        >>> Kvm().create_vm().check_extension(Cap.READONLY_MEM)
        1
        """
        name = cap.name if isinstance(cap, Cap) else str(cap)
        return self._ioctl("CHECK_EXTENSION", int(cap), f"KVM_CAP_{name}")

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """Map host memory at a guest-physical range (memory_size 0 deletes the slot).

        >>> import mmap
        >>> vm, ram = Kvm().create_vm(), mmap.mmap(-1, 0x10000)
        >>> vm.set_user_memory_region(0, 0x0, len(ram), host_address(ram))
        >>> vm.set_user_memory_region(1, 0x8000, len(ram), host_address(ram))
        Traceback (most recent call last):
        vlab.kvm.errors.KvmError: KVM_SET_USER_MEMORY_REGION failed: EEXIST ...
        """
        region = ffi.new("struct kvm_userspace_memory_region *",
                         {"slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
                          "memory_size": memory_size, "userspace_addr": userspace_addr})
        ro = " READONLY" if flags & KVM_MEM_READONLY else ""
        self._ioctl("SET_USER_MEMORY_REGION", region,
                    f"slot={slot} gpa={guest_phys_addr:#x} size={memory_size:#x}"
                    f" hva={userspace_addr:#x}{ro}")

    def get_dirty_log(self, slot: int, memory_size: int) -> bytes:
        """Pages of `slot` the guest wrote since the last call, one bit per 4 KiB page (the
        slot needs KVM_MEM_LOG_DIRTY_PAGES); what live migration copies, round by round.

        >>> import mmap
        >>> vm, ram = Kvm().create_vm(), mmap.mmap(-1, 0x10000)
        >>> vm.set_user_memory_region(0, 0, len(ram), host_address(ram), KVM_MEM_LOG_DIRTY_PAGES)
        >>> vm.get_dirty_log(0, len(ram))   # 16 pages, none written by a guest yet
        b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
        """
        pages = -(-memory_size // PAGE_SIZE)
        bitmap = ffi.new("uint8_t[]", ((pages + 63) // 64) * 8)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        self._ioctl("GET_DIRTY_LOG", log, f"slot={slot}")
        return bytes(ffi.buffer(bitmap))

    def set_tss_addr(self, address: int) -> None:
        """Three pages KVM needs for real-mode emulation on Intel (QEMU: kvm_arch_init).

        >>> Kvm().create_vm().set_tss_addr(0xFEFFD000)
        """
        self._ioctl("SET_TSS_ADDR", address, f"{address:#x}")

    def set_identity_map_addr(self, address: int) -> None:
        """One page for the EPT identity map used while the guest runs unpaged.

        >>> Kvm().create_vm().set_identity_map_addr(0xFEFFC000)
        """
        value = ffi.new("uint64_t *", address)
        self._ioctl("SET_IDENTITY_MAP_ADDR", value, f"{address:#x}")

    def create_irqchip(self) -> None:
        """Create the PIC pair, IOAPIC and per-vCPU local APICs inside the kernel.

        >>> vm = Kvm().create_vm()
        >>> vm.create_irqchip()
        >>> len(vm.create_vcpu(0).get_lapic())   # now each vCPU has a local APIC
        1024
        """
        self._ioctl("CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        """Create the in-kernel i8254 PIT (needs the irqchip first).

        >>> vm = Kvm().create_vm()
        >>> vm.create_irqchip()
        >>> vm.create_pit2()
        """
        config = ffi.new("struct kvm_pit_config *", {"flags": flags})
        self._ioctl("CREATE_PIT2", config, f"flags={flags:#x}")

    def irq_line(self, irq: int, level: int) -> None:
        """Raise or lower an interrupt line of the in-kernel irqchip.

        >>> vm = Kvm().create_vm()
        >>> vm.create_irqchip()
        >>> vm.irq_line(4, 1); vm.irq_line(4, 0)   # COM1's IRQ pulsed
        """
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        self._ioctl("IRQ_LINE", line, f"irq={irq} level={level}")

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM, with up to four arguments.

        >>> Kvm().create_vm().enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
        """
        name = cap.name if isinstance(cap, Cap) else str(cap)
        request = ffi.new("struct kvm_enable_cap *",
                          {"cap": int(cap), "flags": flags, "args": list(args) + [0] * (4 - len(args))})
        self._ioctl("ENABLE_CAP", request, f"KVM_CAP_{name} args={list(args)}")

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], default_allow: bool = True) -> None:
        """Install an MSR filter: ranges of (flags, base, nmsrs, bitmap), flags being
        KVM_MSR_FILTER_READ (1) / WRITE (2); a clear bit sends the access to userspace
        (with KVM_CAP_X86_USER_SPACE_MSR enabled).

        >>> vm = Kvm().create_vm()
        >>> vm.enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
        >>> vm.set_msr_filter([(KVM_MSR_FILTER_READ, 0x10, 1, b"\\0")])   # RDMSR of the TSC exits
        """
        if len(ranges) > 16:
            raise ValueError(f"{len(ranges)} MSR filter ranges; KVM takes at most 16")
        keep = []
        ranges_init = []
        for flags, base, nmsrs, bitmap in ranges:
            if len(bitmap) * 8 < nmsrs:
                raise ValueError(f"bitmap of {len(bitmap)} bytes is too short for {nmsrs} MSRs")
            buf = ffi.new("uint8_t[]", bytes(bitmap))
            keep.append(buf)
            ranges_init.append({"flags": flags, "nmsrs": nmsrs, "base": base, "bitmap": buf})
        msr_filter = ffi.new("struct kvm_msr_filter *",
                             {"flags": 0 if default_allow else 1, "ranges": ranges_init})
        self._ioctl("X86_SET_MSR_FILTER", msr_filter,
                    f"{len(ranges)} ranges, default {'allow' if default_allow else 'deny'}")

    def get_stats_fd(self) -> StatsFd:
        """The VM's binary stats fd: KVM's own counters for the whole VM.

        >>> "remote_tlb_flush" in Kvm().create_vm().get_stats_fd().names()
        True
        """
        return StatsFd(self._ioctl("GET_STATS_FD"), "vm")

    def create_vcpu(self, vcpu_id: int = 0) -> VcpuFd:
        """KVM_CREATE_VCPU, then map its `kvm_run` (QEMU: kvm_init_vcpu / kvm_get_vcpu).

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.id, vcpu.get_mp_state().name
        (0, 'RUNNABLE')
        """
        fd = self._ioctl("CREATE_VCPU", vcpu_id, f"id={vcpu_id}")
        try:  # the mapping's size is asked for each vCPU, after its fd, as kvm_init_vcpu does
            vcpu = VcpuFd(self, fd, vcpu_id, self.kvm.get_vcpu_mmap_size())
        except BaseException:
            close_fd(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close the vCPUs (in reverse order of creation), then the VM.

        >>> vm = Kvm().create_vm()
        >>> vcpu = vm.create_vcpu(0)
        >>> vm.close()
        >>> vcpu.closed, vm.closed
        (True, True)
        """
        for vcpu in reversed(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        super().close()

    def __repr__(self) -> str:
        return f"<VmFd fd={self.fd} vcpus={len(self.vcpus)}{' closed' if self.closed else ''}>"
