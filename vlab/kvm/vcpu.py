"""The vCPU fd (`KVM_CREATE_VCPU`) and its shared `struct kvm_run` mapping.

A real-mode guest run until it halts, each exit answered as QEMU's kvm_cpu_exec does:

    >>> import mmap
    >>> vm, ram = Kvm().create_vm(), mmap.mmap(-1, 0x8000)
    >>> vm.set_user_memory_region(0, 0, len(ram), host_address(ram))  # 0x8000.. is unbacked
    >>> ram[0x1000:0x100a] = bytes.fromhex(
    ...     "e460"      # in al, 0x60
    ...     "e6e9"      # out 0xe9, al
    ...     "a000f0"    # mov al, [0xf000]   (no RAM there: MMIO)
    ...     "e6e9"      # out 0xe9, al
    ...     "f4")       # hlt
    >>> vcpu = vm.create_vcpu(0)
    >>> sregs = vcpu.get_sregs()
    >>> vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
    >>> vcpu.set_regs(Regs(rip=0x1000))
    >>> port_in = vcpu.run(); port_in
    IoIn(port=96, size=1, count=1, data_offset=4096)
    >>> vcpu.complete_io_in(port_in, b"*")
    >>> vcpu.run()
    IoOut(port=233, size=1, count=1, data=b'*')
    >>> load = vcpu.run(); load
    MmioRead(address=61440, length=1)
    >>> vcpu.complete_mmio_read(load, b"!")
    >>> vcpu.run(), vcpu.run()
    (IoOut(port=233, size=1, count=1, data=b'!'), Hlt())
    >>> hex(vcpu.get_regs().rip)   # past the HLT
    '0x100a'
"""
from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import signal
import struct
import threading
import weakref

from .abi import Ioctl, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, ffi
from .convert import regs_from_c
from .errors import KvmError
from .exits import Exit, ExitDecodeError, Interrupted, IoIn, IoOut, MmioRead, X86Rdmsr, decode
from .stats import StatsFd
from .state import Regs
from .trace import ioctl
from .vcpu_state import VcpuStateIoctls
from ..x86 import HW_BREAKPOINTS

try:  # the compiled exit path (setup.py builds it where a C compiler and Python.h exist)
    from . import _exitpath
except ImportError:
    _exitpath = None

_RUN = int(Ioctl.RUN)
_RIP = struct.Struct("<Q")
_RIP_OFFSET = ffi.offsetof("struct kvm_run", "s") + ffi.offsetof("struct kvm_regs", "rip")
_INTERRUPTED = (errno.EINTR, errno.EAGAIN)


KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> bool:
    """A no-op handler for the kick signal, so that it interrupts KVM_RUN (EINTR) instead of
    killing the process. Only the main thread may install it; True once it is in place."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return True


def _release(fd: int, mapping: mmap.mmap, view) -> None:
    ffi.release(view)
    mapping.close()
    os.close(fd)


def _unmapped(vcpu_id: int, field: str) -> KvmError:
    return KvmError(errno.EBADF, "RUN", detail=f"vCPU {vcpu_id} is closed; kvm_run.{field} is unmapped")


class _ClosedRun:
    """Stands in for the unmapped kvm_run of a closed vCPU."""

    def __init__(self, vcpu_id: int):
        self._vcpu_id = vcpu_id

    def __getattr__(self, name):
        raise _unmapped(self._vcpu_id, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            return object.__setattr__(self, name, value)
        self.__getattr__(name)


class VcpuFd(VcpuStateIoctls):
    """One virtual CPU (QEMU's `CPUState.kvm_fd` with `CPUState.kvm_run`)."""

    fd_kind = "vcpu"

    def __init__(self, vm, fd: int, vcpu_id: int, mmap_size: int):
        # The VM keeps its vCPUs (vm.vcpus), a vCPU only a proxy of its VM: no reference
        # cycle, so a VM dropped without close() gives its fds back at once.
        self.vm = weakref.proxy(vm)
        self.tracer = vm.tracer
        self._listeners = self.tracer.listeners  # the same list, read once per KVM_RUN
        self.fd = fd
        self.id = self._vcpu_id = vcpu_id
        self.mmap_size = mmap_size
        self._mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = ffi.from_buffer(self._mapping)
        self.kvm_run = ffi.cast("struct kvm_run *", self._view)
        # KVM_RUN through the compiled exit path, its arguments bound once (None: in Python)
        self._run_compiled = (None if _exitpath is None else functools.partial(
            _exitpath.run, fd, int(ffi.cast("uintptr_t", self.kvm_run)), mmap_size, IoOut, IoIn))
        self._finalizer = weakref.finalize(self, _release, fd, self._mapping, self._view)
        install_kick_handler()  # now, while (typically) in the main thread: kicks need it

    # --- KVM_RUN ------------------------------------------------------------------------------
    def run(self) -> Exit:
        """Enter the guest until KVM needs userspace; return why, decoded.

        A signal or `immediate_exit` ends KVM_RUN with EINTR: that is `Interrupted`, not an
        error, and the vCPU resumes where it was on the next call. Untraced, this is the
        hottest call of all: KVM_RUN and a port-I/O exit's decoding go through `_exitpath`
        (C) where it was built, else through `fcntl.ioctl` and `decode`; traced, through
        `trace.ioctl`, which records it.
        """
        listeners = self._listeners
        if not listeners:   # else counted by trace.ioctl
            self.tracer.issued += 1
        if self._run_compiled is not None and not listeners:
            exit = self._run_compiled()
            if exit is None:
                return self.decode_exit()
            if exit.__class__ is int:
                return self._run_failed(KvmError(-exit, "RUN"))
            return exit
        try:
            if listeners:
                ioctl(self.tracer, "vcpu", self.fd, "RUN", _RUN, None, "", self.id)
            else:
                fcntl.ioctl(self.fd, _RUN)
        except KvmError as e:
            return self._run_failed(e)
        except OSError as e:
            return self._run_failed(KvmError(e.errno, "RUN"))
        except ValueError:  # fcntl refuses fd -1: closed
            return self._run_failed(KvmError(errno.EBADF, "RUN"))
        return self.decode_exit()

    def decode_exit(self) -> Exit:
        """The exit kvm_run holds now (that of the last KVM_RUN), decoded in Python.

        >>> Kvm().create_vm().create_vcpu(0).decode_exit()   # before any KVM_RUN
        Unknown(hardware_exit_reason=0)
        """
        return decode(self.kvm_run, self.mmap_size, self._mapping)

    def _run_failed(self, error: KvmError) -> Interrupted:
        """EINTR or EAGAIN: interrupted, a normal outcome. Anything else is raised."""
        if error.errno in _INTERRUPTED:
            self.kvm_run.immediate_exit = 0
            return Interrupted()
        if self.closed:
            raise KvmError(errno.EBADF, "RUN", detail=f"vCPU {self.id} is closed") from None
        raise error from None

    @property
    def exit_reason(self) -> int:
        return self.kvm_run.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """Set before kicking the thread with a signal: KVM_RUN then returns at once even if
        the signal lands while the thread is outside the ioctl."""
        self.kvm_run.immediate_exit = 1 if value else 0

    def kick(self, thread_ident: int | None = None) -> None:
        """Stop a KVM_RUN in progress in thread `thread_ident` (or the next one): set
        `immediate_exit`, then signal the thread so the ioctl returns EINTR, as QEMU's
        `qemu_cpu_kick` does with SIG_IPI.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.kick()
        >>> vcpu.run(), vcpu.immediate_exit   # returned before entering the guest
        (Interrupted(), False)
        """
        self.kvm_run.immediate_exit = 1
        if thread_ident is not None and thread_ident != threading.get_ident() \
                and install_kick_handler():
            signal.pthread_kill(thread_ident, KICK_SIGNAL)

    def complete_io_in(self, exit: IoIn, data: bytes) -> None:
        """Answer an IN: the bytes land in kvm_run and KVM puts them in the guest's register
        (or memory, for INS) on the next KVM_RUN."""
        length = exit.size * exit.count
        if len(data) != length:
            raise ValueError(f"IN from port {exit.port:#x} needs {length} bytes, got {len(data)}")
        if exit.data_offset + length > self.mmap_size:
            raise ExitDecodeError(f"io.data_offset {exit.data_offset:#x} + {length} is outside kvm_run")
        try:
            self._mapping[exit.data_offset:exit.data_offset + length] = data
        except ValueError:  # the mapping is closed
            raise _unmapped(self.id, "io data") from None

    def complete_mmio_read(self, exit: MmioRead, data: bytes) -> None:
        """Answer an MMIO load: `length` bytes into kvm_run.mmio.data."""
        if len(data) != exit.length or not 1 <= exit.length <= 8:
            raise ValueError(f"MMIO read at {exit.address:#x} needs {exit.length} bytes, got {len(data)}")
        ffi.memmove(self.kvm_run.mmio.data, data, exit.length)

    def complete_rdmsr(self, exit: X86Rdmsr, value: int = 0, error: bool = False) -> None:
        """Answer a RDMSR exit; `error` makes the guest take #GP.

        >>> import mmap
        >>> vm, ram = Kvm().create_vm(), mmap.mmap(-1, 0x8000)
        >>> vm.set_user_memory_region(0, 0, len(ram), host_address(ram))
        >>> vm.enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
        >>> vm.set_msr_filter([(KVM_MSR_FILTER_READ, 0x10, 1, b"\\0")])   # the TSC's reads
        >>> ram[0x1000:0x1006] = bytes.fromhex("b91000" "0f32" "f4")   # mov cx, 0x10; rdmsr; hlt
        >>> vcpu = vm.create_vcpu(0)
        >>> sregs = vcpu.get_sregs()
        >>> vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
        >>> vcpu.set_regs(Regs(rip=0x1000))
        >>> rdmsr = vcpu.run(); rdmsr
        X86Rdmsr(index=16, msr_reason=4)
        >>> vcpu.complete_rdmsr(rdmsr, 0x1234_5678_9ABC)
        >>> vcpu.run(), hex(vcpu.get_regs().rdx), hex(vcpu.get_regs().rax)
        (Hlt(), '0x1234', '0x56789abc')
        """
        self.kvm_run.msr.data = value
        self.kvm_run.msr.error = 1 if error else 0

    def enable_sync_regs(self, mask: int) -> None:
        """Ask KVM to copy register classes into kvm_run.s on every exit (KVM_CAP_SYNC_REGS),
        so RIP is known per exit without a KVM_GET_REGS ioctl.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.enable_sync_regs(KVM_SYNC_X86_REGS)
        >>> vcpu.kick(); vcpu.run()
        Interrupted()
        >>> hex(vcpu.synced_rip)   # the reset vector's offset in CS F000
        '0xfff0'
        """
        self.kvm_run.kvm_valid_regs = mask

    @property
    def synced_rip(self) -> int:
        """RIP at the last exit, from kvm_run.s (valid after enable_sync_regs)."""
        try:
            return _RIP.unpack_from(self._mapping, _RIP_OFFSET)[0]
        except ValueError:  # the mapping is closed
            raise _unmapped(self.id, "s.regs.rip") from None

    def synced_regs(self) -> Regs:
        """The general-purpose registers KVM copied into kvm_run.s at the last exit.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.enable_sync_regs(KVM_SYNC_X86_REGS)
        >>> vcpu.kick(); vcpu.run()
        Interrupted()
        >>> vcpu.synced_regs() == vcpu.get_regs()
        True
        """
        return regs_from_c(self.kvm_run.s.regs.regs)

    # --- debugging ----------------------------------------------------------------------------
    def set_guest_debug(self, enable: bool = True, single_step: bool = False,
                        hw_breakpoints: tuple[int, ...] = ()) -> None:
        """Single-step and up to four execution breakpoints through DR0-DR3/DR7.

        >>> import mmap
        >>> vm, ram = Kvm().create_vm(), mmap.mmap(-1, 0x8000)
        >>> vm.set_user_memory_region(0, 0, len(ram), host_address(ram))
        >>> ram[0x1000:0x1004] = bytes.fromhex("90" "90" "90" "f4")   # nop; nop; nop; hlt
        >>> vcpu = vm.create_vcpu(0)
        >>> sregs = vcpu.get_sregs()
        >>> vcpu.set_sregs(sregs.replace(cs=sregs.cs.replace(base=0, selector=0)))
        >>> vcpu.set_regs(Regs(rip=0x1000))
        >>> vcpu.set_guest_debug(single_step=True)
        >>> [hex(vcpu.run().pc) for _ in range(2)]   # a DEBUG exit after each instruction
        ['0x1001', '0x1002']
        """
        if len(hw_breakpoints) > HW_BREAKPOINTS:
            raise ValueError(f"{len(hw_breakpoints)} hardware breakpoints; x86 has {HW_BREAKPOINTS} (DR0-DR3)")
        debug = ffi.new("struct kvm_guest_debug *")
        if enable:
            debug.control = KVM_GUESTDBG_ENABLE
            if single_step:
                debug.control |= KVM_GUESTDBG_SINGLESTEP
            if hw_breakpoints:
                debug.control |= KVM_GUESTDBG_USE_HW_BP
                dr7 = 0
                for i, address in enumerate(hw_breakpoints):
                    debug.arch.debugreg[i] = address
                    dr7 |= 1 << (2 * i)  # Ln: local enable; R/W and LEN 0 = instruction fetch
                debug.arch.debugreg[7] = dr7
        bps = " ".join(f"{a:#x}" for a in hw_breakpoints)
        self._ioctl("SET_GUEST_DEBUG", debug,
                    f"enable={int(enable)} singlestep={int(single_step)}" + (f" bp=[{bps}]" if bps else ""))

    def get_stats_fd(self) -> StatsFd:
        """The vCPU's binary stats fd: KVM's own counters for this vCPU.

        >>> stats = Kvm().create_vm().create_vcpu(0).get_stats_fd()
        >>> stats.read()["halt_exits"]
        0
        """
        return StatsFd(self._ioctl("GET_STATS_FD"), f"vcpu{self.id}")

    def close(self) -> None:
        """Unmap kvm_run and close the fd; later access to kvm_run raises instead of
        touching unmapped memory.

        >>> vcpu = Kvm().create_vm().create_vcpu(0)
        >>> vcpu.close()
        >>> vcpu.run()
        Traceback (most recent call last):
        vlab.kvm.errors.KvmError: KVM_RUN failed: EBADF ...
        """
        self.kvm_run = _ClosedRun(self.id)
        self._run_compiled = None  # its fd and address are gone
        super().close()

    def __repr__(self) -> str:
        return f"<VcpuFd id={self.id} fd={self.fd}{' closed' if self.closed else ''}>"
