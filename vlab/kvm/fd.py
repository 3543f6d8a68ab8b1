"""What the three KVM fds have in common: ioctls through the choke point, and closing."""
from __future__ import annotations

import os

from .abi import Ioctl
from .convert import flexible
from .trace import Tracer, ioctl


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class KvmFd:
    """Base of `Kvm`, `VmFd` and `VcpuFd`. Subclasses set `fd`, `fd_kind`, the `tracer` of
    the Kvm they come from, and a `weakref.finalize` in `_finalizer` that releases what they
    own."""

    fd: int
    fd_kind: str
    tracer: Tracer
    _vcpu_id: int | None = None  # named in trace records of vCPU ioctls

    def _ioctl(self, name: str, arg=None, describe="") -> int:
        return ioctl(self.tracer, self.fd_kind, self.fd, name, getattr(Ioctl, name), arg, describe,
                     self._vcpu_id)

    def _read_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS (on the system fd: feature MSRs; on a vCPU fd: its MSRs); returns
        the MSRs KVM filled, by index."""
        msrs = flexible("struct kvm_msrs", "struct kvm_msr_entry", len(indices))
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        count = self._ioctl("GET_MSRS", msrs, f"{len(indices)} MSRs")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def close(self) -> None:
        """Close the fd (and what it owns); closing twice is harmless.

        >>> kvm = Kvm()
        >>> kvm.close(); kvm.close()
        >>> kvm.closed
        True
        """
        self._finalizer()
        self.fd = -1  # the number may be reused by the next open: see trace.ioctl

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
