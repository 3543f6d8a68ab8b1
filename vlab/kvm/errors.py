"""Errors from the KVM API, each naming the ioctl that failed and, where learners meet it,
what to do about it."""
from __future__ import annotations

import errno as _errno

# (ioctl name or "*", errno) -> hint. The most specific key wins.
_HINTS = {
    ("open", _errno.ENOENT): (
        "/dev/kvm does not exist: the kvm module is not loaded or the CPU's virtualization "
        "extensions are off. Try `modprobe kvm_intel` (or kvm_amd), enable VT-x/AMD-V in the "
        "firmware, or in a container pass `--device /dev/kvm`. Without KVM, use "
        "vlab.Lab(accel='tcg'), the software accelerator."),
    ("open", _errno.EACCES): (
        "/dev/kvm exists but this user may not open it. Add yourself to its group "
        "(`sudo usermod -aG kvm $USER`, then log in again) or ask for read/write access. "
        "Without KVM, use vlab.Lab(accel='tcg')."),
    ("open", _errno.EPERM): (
        "opening /dev/kvm was refused (EPERM): a sandbox or security policy blocks it."),
    ("SET_SREGS", _errno.EINVAL): (
        "KVM rejected the special registers: an inconsistent combination of CR0/CR4/EFER "
        "(e.g. CR0.PG without PE, EFER.LME with CR0.PG but without LMA, CR4 bits the host "
        "lacks). vlab.kvm.sregs_check.check_sregs() names the bit."),
    ("SET_CPUID2", _errno.EINVAL): (
        "KVM rejected the CPUID table: a leaf is malformed or claims something KVM cannot "
        "provide (compare against KVM_GET_SUPPORTED_CPUID)."),
    ("SET_CPUID2", _errno.E2BIG): (
        "too many CPUID entries: KVM accepts at most 256 (KVM_MAX_CPUID_ENTRIES)."),
    ("GET_SUPPORTED_CPUID", _errno.E2BIG): (
        "the buffer was too small for the host's CPUID table; pass a larger nent."),
    ("GET_CPUID2", _errno.E2BIG): (
        "the buffer was too small for this vCPU's CPUID table; pass a larger nent."),
    ("SET_USER_MEMORY_REGION", _errno.EEXIST): (
        "the new memory slot overlaps guest-physical memory another slot already maps; "
        "choose a free range or delete the old slot (memory_size=0) first."),
    ("SET_USER_MEMORY_REGION", _errno.EINVAL): (
        "invalid memory slot: guest address, size and host address must be page aligned, "
        "and the slot number below KVM_CAP_NR_MEMSLOTS."),
    ("CREATE_VCPU", _errno.EEXIST): ("a vCPU with this id already exists in the VM."),
    ("CREATE_VCPU", _errno.EINVAL): ("the vCPU id is above KVM_CAP_MAX_VCPU_ID."),
    ("*", _errno.EBADF): (
        "the file descriptor is closed or not a KVM fd (was the VM or vCPU closed?)."),
    ("*", _errno.ENOTTY): (
        "this fd does not understand that ioctl: it was sent to the wrong fd kind "
        "(system, VM or vCPU) or the kernel lacks the capability that gates it."),
}


class KvmError(OSError):
    """An ioctl (or /dev/kvm open) failed; `ioctl` names it, `hint` says what to do.
    `detail` adds context; for "open" it is the path."""

    def __init__(self, err: int, ioctl: str, hint: str | None = None, detail: str = ""):
        self.ioctl = ioctl
        self.hint = hint if hint is not None else hint_for(ioctl, err)
        name = _errno.errorcode.get(err, str(err))
        if ioctl == "open":
            message = f"cannot open {detail or '/dev/kvm'}: {name} ({_os_strerror(err)})"
        else:
            message = f"KVM_{ioctl} failed: {name} ({_os_strerror(err)})"
            if detail:
                message += f" [{detail}]"
        if self.hint:
            message += f"\n  hint: {self.hint}"
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used on this machine."""


class VmLimitReached(KvmError):
    """KVM_CREATE_VM not issued: this user's processes hold $VLAB_MAX_VMS VMs already (a
    limit per student on a shared host, such as a class's JupyterHub)."""

    def __init__(self, limit: int, held: int):
        self.limit, self.held = limit, held
        super().__init__(
            _errno.EMFILE, "CREATE_VM", detail=f"$VLAB_MAX_VMS={limit}: your processes hold {held}",
            hint="close a Lab you no longer need (lab.close()), or shut down the kernel of a "
                 "notebook you have finished: the limit counts the VMs of all your kernels.")


def hint_for(ioctl: str, err: int) -> str | None:
    return _HINTS.get((ioctl, err)) or _HINTS.get(("*", err))


def _os_strerror(err: int) -> str:
    import os
    return os.strerror(err)
