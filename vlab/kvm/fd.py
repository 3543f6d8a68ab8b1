"""What the three KVM fds have in common: ioctls through the choke point, and closing."""
from __future__ import annotations

from .abi import Ioctl
from .trace import ioctl


class KvmFd:
    """Base of `Kvm`, `VmFd` and `VcpuFd`. Subclasses set `fd`, `fd_kind` and a
    `weakref.finalize` in `_finalizer` that releases what they own."""

    fd: int
    fd_kind: str
    _vcpu_id: int | None = None  # named in trace records of vCPU ioctls

    def _ioctl(self, name: str, arg=None, describe="") -> int:
        return ioctl(self.fd_kind, self.fd, name, getattr(Ioctl, name), arg, describe,
                     self._vcpu_id)

    def close(self) -> None:
        self._finalizer()
        self.fd = -1  # the number may be reused by the next open: see trace.ioctl

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
