"""The one choke point every KVM ioctl passes through.

Each call can be recorded as an `IoctlRecord` (fd kind, ioctl name, decoded argument
summary, result or errno, duration) for the listeners of the `Tracer` the fd belongs to, the
raw material for the lab's stage records and QEMU's trace events (`kvm_ioctl`,
`kvm_vm_ioctl`, `kvm_vcpu_ioctl`). When nobody listens the cost is one truth test and a
count (`Tracer.issued`), which keeps the KVM_RUN loop fast.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import time
from dataclasses import dataclass
from typing import Callable

from .abi import ffi, libc
from .errors import KvmError


@dataclass(frozen=True, slots=True)
class IoctlRecord:
    fd_kind: str            # "system", "vm" or "vcpu" (which fd the kernel dispatched on)
    fd: int
    name: str               # without the KVM_ prefix, e.g. "SET_USER_MEMORY_REGION"
    request: int
    args: str               # decoded argument summary
    result: int | None      # return value; None when it failed
    errno: int | None
    duration_s: float
    vcpu_id: int | None = None

    @property
    def trace_event(self) -> str:
        """QEMU's trace-event name for this call (trace-events in accel/kvm)."""
        return {"system": "kvm_ioctl", "vm": "kvm_vm_ioctl", "vcpu": "kvm_vcpu_ioctl"}[self.fd_kind]

    def __str__(self) -> str:
        outcome = (f"= {self.result}" if self.errno is None
                   else f"-> {__import__('errno').errorcode.get(self.errno, self.errno)}")
        who = f"vcpu{self.vcpu_id}" if self.vcpu_id is not None else self.fd_kind
        return f"{who:>7} KVM_{self.name}({self.args}) {outcome}  [{self.duration_s * 1e6:.1f} us]"


Listener = Callable[[IoctlRecord], None]


class Tracer:
    """The listeners of one `Kvm`'s ioctls and of every VM and vCPU made from it.

    Whoever opens /dev/kvm owns its tracer (a Lab owns one for its VM), so recording one VM
    neither records another nor slows another's KVM_RUN. `issued` counts every ioctl on its
    fds, heard or not (the compiled run loop's KVM_RUNs too, added as it returns): a stage
    keeps the first calls it hears and counts the rest by it, without a listener that would
    keep the run loop in Python."""

    __slots__ = ("listeners", "issued")

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.issued = 0

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every IoctlRecord from now on; returns the unsubscribe
        function."""
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def recording(self) -> "recording":
        """`with kvm.tracer.recording() as calls:` collects every ioctl issued inside."""
        return recording(self)


class recording:
    """Context manager collecting the ioctls a tracer sees while it is open."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __enter__(self) -> list[IoctlRecord]:
        self.calls: list[IoctlRecord] = []
        self._unsubscribe = self.tracer.subscribe(self.calls.append)
        return self.calls

    def __exit__(self, *exc) -> None:
        self._unsubscribe()


def _call(fd: int, request: int, arg) -> int:
    """Integer (or no) argument: Python's own ioctl, the cheapest call on the KVM_RUN path.
    A pointer argument: libc's ioctl through cffi, so the kernel reads and writes the
    struct in place whatever its size. Returns the result or -errno."""
    if fd < 0:  # closed (see `ioctl`)
        return -_errno.EBADF
    if isinstance(arg, int) and not 0 <= arg < 2**31:  # fcntl.ioctl takes a C int
        arg = ffi.cast("void *", arg)
    if arg is None or isinstance(arg, int):
        try:
            return fcntl.ioctl(fd, request) if arg is None else fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            return -_errno.EINTR
        except OSError as e:
            return -e.errno
    result = libc.ioctl(fd, request, arg)
    return -ffi.errno if result < 0 else result


def ioctl(tracer: Tracer, fd_kind: str, fd: int, name: str, request: int, arg=None,
          describe: str | Callable[[], str] = "", vcpu_id: int | None = None) -> int:
    """Issue one ioctl; record it for the tracer's listeners; raise KvmError naming it on
    failure.

    A closed Kvm, VmFd or VcpuFd holds fd -1: its number may already belong to a newer file
    (another VM's vCPU, say), so the call fails with EBADF instead of reaching it."""
    tracer.issued += 1
    listeners = tracer.listeners
    if not listeners:
        if arg is None:  # KVM_RUN and the other argument-less ioctls: the hot path
            try:
                return fcntl.ioctl(fd, request)
            except OSError as e:
                raise KvmError(e.errno, name) from None
            except ValueError:  # fcntl refuses fd -1
                raise KvmError(_errno.EBADF, name) from None
        result = _call(fd, request, arg)
        if result < 0:
            raise KvmError(-result, name)
        return result
    start = time.perf_counter()
    result = _call(fd, request, arg)
    duration = time.perf_counter() - start
    err = -result if result < 0 else None
    record = IoctlRecord(fd_kind, fd, name, request, describe() if callable(describe) else describe,
                         None if err else result, err, duration, vcpu_id)
    for listener in tuple(listeners):
        listener(record)
    if err:
        raise KvmError(err, name)
    return result
