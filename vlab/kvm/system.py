"""`/dev/kvm`, the system fd: what the host's KVM offers, and the factory of VMs."""
from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

from . import backend as _backend
from .abi import Cap
from .convert import flexible
from .errors import KvmError, KvmUnavailable
from .state import CpuidEntry
from .fd import KvmFd

if TYPE_CHECKING:
    from .vm import VmFd

DEV_KVM = "/dev/kvm"
DEVICE_ENV = "VLAB_KVM_DEVICE"


def device_path() -> str:
    """The KVM device to open: $VLAB_KVM_DEVICE when set, else /dev/kvm. Pointing it at a
    missing file shows what the lab does on a machine without KVM."""
    return os.environ.get(DEVICE_ENV) or DEV_KVM


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def cpuid_entries_from_c(cpuid) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))]


def cpuid_to_c(entries: list[CpuidEntry]):
    cpuid = flexible("struct kvm_cpuid2", "struct kvm_cpuid_entry2", len(entries))
    cpuid.nent = len(entries)
    for target, e in zip((cpuid.entries[i] for i in range(len(entries))), entries):
        (target.function, target.index, target.flags, target.eax, target.ebx, target.ecx,
         target.edx) = (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
    return cpuid


class Kvm(KvmFd):
    """The open `/dev/kvm` (QEMU's `KVMState.fd`, opened in `kvm_init`)."""

    fd_kind = "system"

    def __init__(self, path: str | None = None):
        path = path or device_path()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(e.errno, "open", detail=path) from None
        self.path = path
        self._finalizer = weakref.finalize(self, _close, self.fd)
        self._vcpu_mmap_size: int | None = None

    # --- the ioctls -----------------------------------------------------------------------
    def get_api_version(self) -> int:
        return self._ioctl("GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        name = cap.name if isinstance(cap, Cap) else str(cap)
        return self._ioctl("CHECK_EXTENSION", int(cap), f"KVM_CAP_{name}")

    def get_vcpu_mmap_size(self) -> int:
        size = self._ioctl("GET_VCPU_MMAP_SIZE")
        self._vcpu_mmap_size = size
        return size

    @property
    def vcpu_mmap_size(self) -> int:
        return self._vcpu_mmap_size or self.get_vcpu_mmap_size()

    def get_supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        cpuid = flexible("struct kvm_cpuid2", "struct kvm_cpuid_entry2", max_entries)
        cpuid.nent = max_entries
        self._ioctl("GET_SUPPORTED_CPUID", cpuid, f"nent={max_entries}")
        return cpuid_entries_from_c(cpuid)

    def _msr_list(self, name: str, max_entries: int) -> list[int]:
        msrs = flexible("struct kvm_msr_list", "uint32_t", max_entries)
        msrs.nmsrs = max_entries
        self._ioctl(name, msrs, f"nmsrs={max_entries}")
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def get_msr_index_list(self, max_entries: int = 1024) -> list[int]:
        """MSRs KVM saves and restores for a vCPU (what QEMU migrates)."""
        return self._msr_list("GET_MSR_INDEX_LIST", max_entries)

    def get_msr_feature_index_list(self, max_entries: int = 1024) -> list[int]:
        """Feature MSRs (e.g. IA32_ARCH_CAPABILITIES) readable on this fd."""
        return self._msr_list("GET_MSR_FEATURE_INDEX_LIST", max_entries)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read feature MSRs on the system fd (KVM_GET_MSRS, KVM_CAP_GET_MSR_FEATURES)."""
        from .vcpu import read_msrs
        return read_msrs(self, indices)

    def create_vm(self, machine_type: int = 0) -> "VmFd":
        from .vm import VmFd
        fd = self._ioctl("CREATE_VM", machine_type, f"type={machine_type}")
        return VmFd(self, fd)

    # --- conveniences -----------------------------------------------------------------------
    def capabilities(self) -> dict[Cap, int]:
        """Every KVM_CAP with the value KVM_CHECK_EXTENSION returns (0 = absent)."""
        return {cap: self.check_extension(cap) for cap in Cap}

    @staticmethod
    def backend() -> _backend.Backend:
        return _backend.detect()


    def __repr__(self) -> str:
        return f"<Kvm fd={self.fd}{' closed' if self.closed else ''}>"


def kvm_usable(path: str | None = None) -> tuple[bool, str]:
    """Can this process use KVM (at `path`, by default `device_path()`)? (True, why) or
    (False, why not)."""
    path = path or device_path()
    try:
        with Kvm(path) as kvm:
            version = kvm.get_api_version()
    except KvmError as e:
        return False, str(e)
    if version != 12:
        return False, f"KVM API version {version}, vlab needs 12"
    return True, f"{path} opened, API version {version}"


__all__ = ["Kvm", "kvm_usable", "device_path", "DEV_KVM", "DEVICE_ENV"]
