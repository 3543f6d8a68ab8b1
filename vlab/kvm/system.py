"""`/dev/kvm`, the system fd: what the host's KVM offers, and the factory of VMs."""
from __future__ import annotations

import os
import weakref

from .abi import Cap
from .convert import cpuid_entries_from_c, flexible
from .errors import KvmError, KvmUnavailable, VmLimitReached
from .state import CpuidEntry
from .vm import VmFd
from .fd import KvmFd, close_fd
from .trace import Tracer

DEV_KVM = "/dev/kvm"
DEVICE_ENV = "VLAB_KVM_DEVICE"
MAX_VMS_ENV = "VLAB_MAX_VMS"
VM_FD_TARGET = "anon_inode:kvm-vm"   # what /proc/PID/fd/N links to for a VM fd


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
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22.

        >>> Kvm().get_api_version()
        12
        """
        return self._ioctl("GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent, else its value.

        >>> Kvm().check_extension(Cap.USER_MEMORY)
        1
        """
        name = cap.name if isinstance(cap, Cap) else str(cap)
        return self._ioctl("CHECK_EXTENSION", int(cap), f"KVM_CAP_{name}")

    def get_vcpu_mmap_size(self) -> int:
        """Bytes to mmap from each vCPU fd: struct kvm_run, then the PIO data page, ...

        >>> Kvm().get_vcpu_mmap_size() % 4096
        0
        """
        size = self._ioctl("GET_VCPU_MMAP_SIZE")
        self._vcpu_mmap_size = size
        return size

    @property
    def vcpu_mmap_size(self) -> int:
        return self._vcpu_mmap_size or self.get_vcpu_mmap_size()

    def get_supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """What this host's KVM can offer a guest, leaf by leaf (QEMU filters its CPU model
        with it).

        >>> leaves = {entry.function for entry in Kvm().get_supported_cpuid()}
        >>> {0, 1, 0x40000000, 0x80000000} <= leaves   # KVM's own leaf 0x40000000 included
        True
        """
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
        """MSRs KVM saves and restores for a vCPU (what QEMU migrates).

        >>> 0x174 in Kvm().get_msr_index_list()   # IA32_SYSENTER_CS
        True
        """
        return self._msr_list("GET_MSR_INDEX_LIST", max_entries)

    def get_msr_feature_index_list(self, max_entries: int = 1024) -> list[int]:
        """Feature MSRs (e.g. IA32_ARCH_CAPABILITIES) readable on this fd.

        >>> kvm = Kvm()
        >>> features = kvm.get_msr_feature_index_list()
        >>> set(kvm.get_msrs(features)) <= set(features)
        True
        """
        return self._msr_list("GET_MSR_FEATURE_INDEX_LIST", max_entries)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read feature MSRs on the system fd (KVM_GET_MSRS, KVM_CAP_GET_MSR_FEATURES).

        >>> kvm = Kvm()
        >>> values = kvm.get_msrs(kvm.get_msr_feature_index_list())
        >>> all(isinstance(value, int) for value in values.values())
        True
        """
        return self._read_msrs(indices)

    def create_vm(self, machine_type: int = 0) -> VmFd:
        """KVM_CREATE_VM: a VM with no memory and no vCPUs yet.

        >>> vm = Kvm().create_vm()
        >>> vm.vcpus, vm.closed
        ([], False)
        """
        limit = os.environ.get(MAX_VMS_ENV)
        if limit and (held := vms_held_by(os.getuid())) >= int(limit):
            raise VmLimitReached(int(limit), held)
        fd = self._ioctl("CREATE_VM", machine_type, f"type={machine_type}")
        return VmFd(self, fd)

    # --- conveniences -----------------------------------------------------------------------
    def capabilities(self) -> dict[Cap, int]:
        """Every KVM_CAP with the value KVM_CHECK_EXTENSION returns (0 = absent).

        >>> Kvm().capabilities()[Cap.USER_MEMORY]
        1
        """
        return {cap: self.check_extension(cap) for cap in Cap}

    def __repr__(self) -> str:
        return f"<Kvm fd={self.fd}{' closed' if self.closed else ''}>"


def vm_fds(pid: int | str) -> int:
    """VM fds open in process `pid`, as /proc shows them (0 where it cannot be read).

    >>> import os
    >>> from vlab.kvm.system import vm_fds
    >>> before = vm_fds(os.getpid())
    >>> with Kvm() as kvm, kvm.create_vm(), kvm.create_vm():
    ...     vm_fds(os.getpid()) - before
    2
    """
    held = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held += os.readlink(f"/proc/{pid}/fd/{fd}") == VM_FD_TARGET
            except FileNotFoundError:   # closed while we looked
                continue
    except (FileNotFoundError, PermissionError):
        pass
    return held


def vms_held_by(uid: int) -> int:
    """VM fds open in all processes of `uid`: the count that $VLAB_MAX_VMS limits (a
    student's kernels are their processes)."""
    held = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                held += vm_fds(pid)
        except FileNotFoundError:
            continue
    return held


def kvm_usable(path: str | None = None) -> tuple[bool, str]:
    """Can this process use KVM (at `path`, by default `device_path()`)? (True, why) or
    (False, why not).

    >>> kvm_usable("/nonexistent")
    (False, "cannot open /nonexistent: ENOENT (No such file or directory)...")
    """
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
