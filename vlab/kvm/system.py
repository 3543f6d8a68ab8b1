"""`/dev/kvm`, the system fd: what the host's KVM offers, and the factory of VMs."""
from __future__ import annotations

import os
import weakref

from .abi import Cap
from .convert import cpuid_entries_from_c, flexible
from .errors import KvmError, KvmUnavailable
from .state import CpuidEntry
from .vm import VmFd
from .fd import KvmFd, close_fd
from .trace import Tracer

DEV_KVM = "/dev/kvm"
DEVICE_ENV = "VLAB_KVM_DEVICE"


def device_path() -> str:
    """The KVM device to open: $VLAB_KVM_DEVICE when set, else /dev/kvm. Pointing it at a
    missing file shows what the lab does on a machine without KVM."""
    return os.environ.get(DEVICE_ENV) or DEV_KVM


class Kvm(KvmFd):
    """The open `/dev/kvm` (QEMU's `KVMState.fd`, opened in `kvm_init`).

    Its `tracer` (given, or a new one) sees every ioctl on it and on its VMs and vCPUs."""

    fd_kind = "system"

    def __init__(self, path: str | None = None, tracer: Tracer | None = None):
        self.tracer = tracer or Tracer()
        path = path or device_path()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(e.errno, "open", detail=path) from None
        self.path = path
        self._finalizer = weakref.finalize(self, close_fd, self.fd)
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
        return self._read_msrs(indices)

    def create_vm(self, machine_type: int = 0) -> VmFd:
        fd = self._ioctl("CREATE_VM", machine_type, f"type={machine_type}")
        return VmFd(self, fd)

    # --- conveniences -----------------------------------------------------------------------
    def capabilities(self) -> dict[Cap, int]:
        """Every KVM_CAP with the value KVM_CHECK_EXTENSION returns (0 = absent)."""
        return {cap: self.check_extension(cap) for cap in Cap}

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
