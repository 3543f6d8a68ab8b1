"""Inside KVM_RUN: KVM's own tracepoints, per VM, read after each KVM_RUN.

`KVM_RUN` is one ioctl, but inside it the kernel loops (`vcpu_run` -> `vcpu_enter_guest` ->
`kvm_x86_ops->run` -> `handle_exit`), handling most exits itself and returning only when it
needs userspace. The kvm tracepoints show that loop: `kvm_entry`/`kvm_exit` for each trip
into the guest (VMX, SVM), `kvm_emulate_insn` for each instruction KVM's emulator runs,
`kvm_pio`, `kvm_cpuid`, `kvm_inj_virq`..., and `kvm_userspace_exit` when KVM_RUN returns.

`KernelTrace` gives one VM its own tracefs instance (`instances/vlab-<pid>-<n>`), with the
kvm events enabled for this process's threads only (`set_event_pid`, and `event-fork` so
vCPU threads created later are followed too), the trace clock CLOCK_MONOTONIC ("mono").
`take(tid, since_ns)` reads what the kernel wrote since (non-blocking reads of each CPU's
`trace_pipe_raw`), decodes it (`vlab.kvm.traceevent`: libtraceevent over the kernel's format
files) into typed records (`vlab.kvm.kernel_events`), and returns the thread's events of
the KVM_RUN it just returned from: those after `since_ns` up to and including its
`kvm_userspace_exit` (every return of KVM_RUN emits one, EINTR included). Events the ring
buffer had to overwrite before they were read are counted in `lost`, never hidden.

    >>> import threading, time
    >>> vm = Kvm().create_vm()
    >>> trace = KernelTrace()            # needs root and tracefs (KernelTraceUnavailable)
    >>> vcpu = vm.create_vcpu(0)
    >>> vcpu.kick()                      # immediate_exit: KVM_RUN returns EINTR at once
    >>> since = time.monotonic_ns()
    >>> vcpu.run()
    Interrupted()
    >>> [e.describe() for e in trace.take(threading.get_native_id(), since)][-1]
    'kvm_userspace_exit: EINTR'
    >>> trace.close(); vm.close()

The instance is removed by `close()`, when the KernelTrace is collected, or at exit; one
left behind by a killed process is removed by the next KernelTrace opened on the machine.
The tracefs root is /sys/kernel/tracing (mounted there if it is not, which needs root), or
`tracing_dir=`, or the path in $VLAB_TRACEFS (`VLAB_TRACEFS=/nonexistent` shows what a
machine without tracefs gets: `KernelTraceUnavailable`, whose message says how to fix it).
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import threading
import time
import weakref
from operator import itemgetter

from . import traceevent
from .kernel_events import KernelEvents, KvmUserspaceExit

TRACEFS_ENV = "VLAB_TRACEFS"
INSTANCE_PREFIX = "vlab"
_INSTANCE = re.compile(rf"{INSTANCE_PREFIX}-(\d+)-\d+$")
# The fewest events a thread's backlog keeps unread (more where the ring buffers hold more);
# past that its oldest go, counted as lost: it bounds what a thread whose events nobody
# takes (another Lab's, in the same process) can hold.
BACKLOG_LIMIT = 1 << 17
_SMALLEST_EVENT = 32        # bytes a kvm event takes in the ring buffer, at least
_counter = itertools.count()
_FIX_ROOT = "run as root (tracefs instances need CAP_SYS_ADMIN)"
KERNEL_TRACE_NEEDS_KVM = ("kernel tracing needs the kvm accelerator: the software "
                          "accelerator (tcg) has no KVM_RUN for the kernel to trace")


class KernelTraceUnavailable(RuntimeError):
    """The kernel's tracepoints cannot be read here; `reason` says why, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        self.reason, self.fix = reason, fix
        super().__init__(f"kernel tracing is unavailable: {reason}\n  fix: {fix}")


def tracing_root(tracing_dir: str | None = None) -> str:
    """The tracefs mount to use: `tracing_dir`, else $VLAB_TRACEFS, else where tracefs is
    mounted (libtracefs mounts it at /sys/kernel/tracing if it is not, which needs root)."""
    explicit = tracing_dir or os.environ.get(TRACEFS_ENV)
    if explicit is not None and not os.path.isdir(explicit):
        raise _no_tracefs_at(explicit)
    try:
        traceevent.libraries()
    except OSError as e:
        raise KernelTraceUnavailable(str(e).split(": install")[0],
                                     "apt install libtraceevent1 libtracefs1 "
                                     "(tools/setup.sh installs them)") from None
    root = explicit or traceevent.mounted_tracefs(mount=os.geteuid() == 0)
    if root is None:
        raise KernelTraceUnavailable(
            "tracefs is not mounted", "as root: mount -t tracefs nodev /sys/kernel/tracing "
            "(vlab mounts it itself when run as root)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise KernelTraceUnavailable(f"{root} cannot be read by this user", _FIX_ROOT)
    if not os.path.isdir(os.path.join(root, "instances")):
        raise _no_tracefs_at(root)
    if not os.path.isdir(os.path.join(root, "events", "kvm")):
        raise KernelTraceUnavailable(f"{root}/events/kvm does not exist: the kvm module "
                                     "is not loaded", "modprobe kvm_intel (or kvm_amd)")
    return root


def _no_tracefs_at(path: str) -> KernelTraceUnavailable:
    return KernelTraceUnavailable(
        f"no tracefs at {path} (no instances/ directory)",
        f"mount tracefs there (mount -t tracefs nodev {path}) or point ${TRACEFS_ENV} at its "
        "mount point")


def kernel_trace_usable(tracing_dir: str | None = None) -> tuple[bool, str]:
    """(True, where) if a KernelTrace can be opened here, else (False, why and the fix):
    what `vlab doctor` prints.

    >>> kernel_trace_usable("/nonexistent")
    (False, 'kernel tracing is unavailable: no tracefs at /nonexistent...')
    """
    try:
        trace = KernelTrace(tracing_dir)
    except KernelTraceUnavailable as e:
        return False, str(e)
    where = trace.path
    trace.close()
    return True, f"kvm tracepoints readable through a tracefs instance ({os.path.dirname(where)})"


def remove_stale_instances(root: str) -> list[str]:
    """Remove the instances a vlab process left behind when it died (killed before it could
    remove them); the names removed."""
    removed = []
    for name in sorted(os.listdir(os.path.join(root, "instances"))):
        match = _INSTANCE.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            os.rmdir(os.path.join(root, "instances", name))
            removed.append(name)
        except OSError:
            pass  # another process removed it first, or a reader still holds it open
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_instance(path: str, fds: list[int]) -> None:
    """Close the readers, then remove the instance (the kernel refuses while one is open)."""
    for fd in fds:
        os.close(fd)
    fds.clear()
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class KernelTrace:
    """The kvm tracepoints of this process, in a tracefs instance of its own.

    `buffer_size_kb` sizes each CPU's ring buffer (the kernel's default otherwise): one
    KVM_RUN that emulates more instructions than fit overwrites its oldest events (`lost`).
    """

    def __init__(self, tracing_dir: str | None = None, buffer_size_kb: int | None = None):
        root = tracing_root(tracing_dir)
        self.root = root
        try:
            remove_stale_instances(root)
        except PermissionError:
            raise KernelTraceUnavailable(f"{root}/instances cannot be read", _FIX_ROOT) from None
        self.name = f"{INSTANCE_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.path = os.path.join(root, "instances", self.name)
        try:
            os.mkdir(self.path)
        except PermissionError:
            raise KernelTraceUnavailable(f"creating {self.path} was refused", _FIX_ROOT) from None
        except OSError as e:
            raise KernelTraceUnavailable(f"creating {self.path} failed: {e.strerror}",
                                         _FIX_ROOT) from None
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _remove_instance, self.path, self._fds)
        try:
            self._configure(buffer_size_kb)
            self.formats = traceevent.Formats.load(root, "kvm")
        except PermissionError as e:
            self.close()
            raise KernelTraceUnavailable(f"{e.filename}: {e.strerror} (lockdown, or not "
                                         "root)", _FIX_ROOT) from None
        except OSError as e:
            self.close()
            raise KernelTraceUnavailable(str(e), "check that tracefs is mounted and readable "
                                         "(vlab doctor)") from None
        self._exit_format = self.formats.named(KvmUserspaceExit.name)
        self._reader = traceevent.SubBufferReader(self.formats)
        self._lock = threading.Lock()
        self._pending: dict[int, list] = {}     # tid -> [(ts, cpu, EventFormat, unpacked)]
        self._dropped = 0

    def _configure(self, buffer_size_kb: int | None) -> None:
        path = self.path
        _write(f"{path}/trace_clock", "mono")   # timestamps comparable with time.monotonic_ns()
        if buffer_size_kb:
            _write(f"{path}/buffer_size_kb", str(buffer_size_kb))
        # Every thread of this process now (the kernel filters by thread id), and with
        # event-fork the threads they create later: vCPU threads are followed wherever made.
        _write(f"{path}/options/event-fork", "1")
        _write(f"{path}/set_event_pid", " ".join(os.listdir("/proc/self/task")))
        _write(f"{path}/events/kvm/enable", "1")
        cpus = sorted(int(d[3:]) for d in os.listdir(f"{path}/per_cpu") if d.startswith("cpu"))
        self.cpus = cpus
        with open(f"{path}/buffer_size_kb") as f:      # "1410", or "7 (expanded: 1408)"
            per_cpu = int(f.read().split()[-1].strip(")"))
        # A thread's backlog holds at least what the ring buffers can (one KVM_RUN's worth).
        self.backlog_limit = max(BACKLOG_LIMIT, per_cpu * 1024 * len(cpus) // _SMALLEST_EVENT)
        for cpu in cpus:
            self._fds.append(os.open(f"{path}/per_cpu/cpu{cpu}/trace_pipe_raw",
                                     os.O_RDONLY | os.O_NONBLOCK))

    @staticmethod
    def now() -> int:
        """The trace clock now (CLOCK_MONOTONIC, ns): pass it to `take` as `since_ns`."""
        return time.monotonic_ns()

    # -- reading ------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Read every CPU's ring buffer dry, sorting what was read by thread."""
        read, page = self._reader.read, self._reader.page
        pending, limit = self._pending, self.backlog_limit
        for cpu, fd in zip(self.cpus, self._fds):
            while (records := read(fd)) is not None:
                for ts, offset, fmt in records:
                    if fmt is None:
                        continue
                    unpacked = fmt.unpack(page, offset)      # common_pid first
                    backlog = pending.setdefault(unpacked[0], [])
                    backlog.append((ts, cpu, fmt, unpacked))
                    if len(backlog) > limit:
                        self._dropped += len(backlog) - limit
                        del backlog[:len(backlog) - limit]

    def take(self, tid: int, since_ns: int = 0) -> KernelEvents:
        """The events thread `tid` caused in its last KVM_RUN: from `since_ns` (the trace
        clock when it entered, `KernelTrace.now()`; earlier events came from other ioctls)
        up to and including its `kvm_userspace_exit`. Call it after KVM_RUN has returned.
        The records (a tuple-like `KernelEvents`) are decoded when first read."""
        with self._lock:
            if not self._fds:
                raise ValueError(f"the kernel trace {self.name} is closed")
            self._drain()
            backlog = self._pending.get(tid)
            if not backlog:
                return KernelEvents([])
            backlog.sort(key=itemgetter(0))
            start = next((i for i, item in enumerate(backlog) if item[0] >= since_ns), len(backlog))
            end = next((i for i in range(start, len(backlog))
                        if backlog[i][2] is self._exit_format), len(backlog) - 1)
            chosen = backlog[start:end + 1]
            del backlog[:end + 1]
            if not backlog:     # vCPU threads come and go (one per run with several vCPUs)
                del self._pending[tid]
        return KernelEvents(chosen)

    @property
    def lost(self) -> int:
        """Events lost so far: those the ring buffers overwrote or dropped before they were
        read (each CPU's `stats`: overrun, commit overrun, dropped events), and those past
        a thread's backlog_limit."""
        if self.closed:
            raise ValueError(f"the kernel trace {self.name} is closed")
        total = self._dropped
        for cpu in self.cpus:
            with open(f"{self.path}/per_cpu/cpu{cpu}/stats") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("overrun", "commit overrun", "dropped events"):
                        total += int(value)
        return total

    def close(self) -> None:
        """Stop tracing and remove the instance."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"KernelTrace({self.path!r}{', closed' if self.closed else ''})"


__all__ = ["KernelTrace", "KernelTraceUnavailable", "kernel_trace_usable", "tracing_root",
           "remove_stale_instances", "TRACEFS_ENV", "KERNEL_TRACE_NEEDS_KVM"]
