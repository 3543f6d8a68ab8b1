"""The vCPU fd (`KVM_CREATE_VCPU`) and its shared `struct kvm_run` mapping."""
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

from .abi import (Ioctl, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
                  MpState, ffi)
from .convert import (cpuid_entries_from_c, cpuid_to_c, flexible, from_python, regs_from_c,
                      regs_to_c, sregs_from_c, sregs_to_c, to_python)
from .errors import KvmError
from .exits import Exit, ExitDecodeError, Interrupted, IoIn, IoOut, MmioRead, X86Rdmsr, decode
from .stats import StatsFd
from .state import DebugRegs, Regs, Sregs
from .fd import KvmFd
from .trace import ioctl

try:  # the compiled exit path (setup.py builds it where a C compiler and Python.h exist)
    from . import _exitpath
except ImportError:
    _exitpath = None

_RUN = int(Ioctl.RUN)
_RIP = struct.Struct("<Q")
_RIP_OFFSET = ffi.offsetof("struct kvm_run", "s") + ffi.offsetof("struct kvm_regs", "rip")
_INTERRUPTED = (errno.EINTR, errno.EAGAIN)
MAX_HW_BREAKPOINTS = 4


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


class VcpuFd(KvmFd):
    """One virtual CPU (QEMU's `CPUState.kvm_fd` with `CPUState.kvm_run`)."""

    fd_kind = "vcpu"

    def __init__(self, vm, fd: int, vcpu_id: int, mmap_size: int):
        self.vm = vm
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
        if self._run_compiled is not None and not listeners:
            exit = self._run_compiled()
            if exit is None:
                return decode(self.kvm_run, self.mmap_size, self._mapping)
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
        `qemu_cpu_kick` does with SIG_IPI."""
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
        """Answer a RDMSR exit; `error` makes the guest take #GP."""
        self.kvm_run.msr.data = value
        self.kvm_run.msr.error = 1 if error else 0

    def enable_sync_regs(self, mask: int) -> None:
        """Ask KVM to copy register classes into kvm_run.s on every exit (KVM_CAP_SYNC_REGS),
        so RIP is known per exit without a KVM_GET_REGS ioctl."""
        self.kvm_run.kvm_valid_regs = mask

    @property
    def synced_rip(self) -> int:
        """RIP at the last exit, from kvm_run.s (valid after enable_sync_regs)."""
        try:
            return _RIP.unpack_from(self._mapping, _RIP_OFFSET)[0]
        except ValueError:  # the mapping is closed
            raise _unmapped(self.id, "s.regs.rip") from None

    def synced_regs(self) -> Regs:
        return regs_from_c(self.kvm_run.s.regs.regs)

    # --- registers ---------------------------------------------------------------------------
    def get_regs(self) -> Regs:
        regs = ffi.new("struct kvm_regs *")
        self._ioctl("GET_REGS", regs)
        return regs_from_c(regs)

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        regs_to_c(regs, c)
        self._ioctl("SET_REGS", c, f"rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x}")

    def get_sregs(self) -> Sregs:
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl("GET_SREGS", sregs)
        return sregs_from_c(sregs)

    def set_sregs(self, sregs: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        sregs_to_c(sregs, c)
        self._ioctl("SET_SREGS", c, f"cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                                    f"efer={sregs.efer:#x} cs={sregs.cs.selector:#x}")

    def _get_struct(self, name: str, ctype: str) -> dict:
        c = ffi.new(f"{ctype} *")
        self._ioctl(name, c)
        return to_python(c[0])

    def _set_struct(self, name: str, ctype: str, value: dict, describe="") -> None:
        self._ioctl(name, ffi.new(f"{ctype} *", from_python(value)), describe)

    def get_fpu(self) -> dict:
        return self._get_struct("GET_FPU", "struct kvm_fpu")

    def set_fpu(self, fpu: dict) -> None:
        self._set_struct("SET_FPU", "struct kvm_fpu", fpu, f"fcw={fpu.get('fcw', 0):#x}")

    def get_vcpu_events(self) -> dict:
        return self._get_struct("GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, events: dict) -> None:
        self._set_struct("SET_VCPU_EVENTS", "struct kvm_vcpu_events", events)

    def get_xcrs(self) -> dict:
        return self._get_struct("GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, xcrs: dict) -> None:
        self._set_struct("SET_XCRS", "struct kvm_xcrs", xcrs, f"nr_xcrs={xcrs.get('nr_xcrs')}")

    def get_lapic(self) -> bytes:
        """The local APIC's 1 KiB register page (needs the in-kernel irqchip)."""
        return self._get_struct("GET_LAPIC", "struct kvm_lapic_state")["regs"]

    def get_mp_state(self) -> MpState:
        return MpState(self._get_struct("GET_MP_STATE", "struct kvm_mp_state")["mp_state"])

    def set_mp_state(self, state: MpState | int) -> None:
        self._set_struct("SET_MP_STATE", "struct kvm_mp_state", {"mp_state": int(state)},
                         MpState(state).name)

    def get_debugregs(self) -> DebugRegs:
        c = self._get_struct("GET_DEBUGREGS", "struct kvm_debugregs")
        return DebugRegs(tuple(c["db"]), c["dr6"], c["dr7"], c["flags"])

    def set_debugregs(self, debugregs: DebugRegs) -> None:
        self._set_struct("SET_DEBUGREGS", "struct kvm_debugregs",
                         {"db": list(debugregs.db), "dr6": debugregs.dr6, "dr7": debugregs.dr7,
                          "flags": debugregs.flags}, f"dr7={debugregs.dr7:#x}")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return self._read_msrs(indices)

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        msrs = flexible("struct kvm_msrs", "struct kvm_msr_entry", len(values))
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = index, data
        return self._ioctl("SET_MSRS", msrs, ", ".join(f"{i:#x}={v:#x}" for i, v in values.items()))

    # --- CPUID, TSC ---------------------------------------------------------------------------
    def set_cpuid2(self, entries) -> None:
        """Give this vCPU its CPUID table (QEMU: kvm_arch_init_vcpu after cpu_x86_cpuid)."""
        self._ioctl("SET_CPUID2", cpuid_to_c(list(entries)), f"nent={len(entries)}")

    def get_cpuid2(self, max_entries: int = 256):
        cpuid = flexible("struct kvm_cpuid2", "struct kvm_cpuid_entry2", max_entries)
        cpuid.nent = max_entries
        self._ioctl("GET_CPUID2", cpuid, f"nent={max_entries}")
        return cpuid_entries_from_c(cpuid)

    def get_tsc_khz(self) -> int:
        return self._ioctl("GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        self._ioctl("SET_TSC_KHZ", khz, f"{khz} kHz")

    # --- debugging ----------------------------------------------------------------------------
    def set_guest_debug(self, enable: bool = True, single_step: bool = False,
                        hw_breakpoints: tuple[int, ...] = ()) -> None:
        """Single-step and up to four execution breakpoints through DR0-DR3/DR7."""
        if len(hw_breakpoints) > MAX_HW_BREAKPOINTS:
            raise ValueError(f"{len(hw_breakpoints)} hardware breakpoints; x86 has {MAX_HW_BREAKPOINTS} (DR0-DR3)")
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
        return StatsFd(self._ioctl("GET_STATS_FD"), f"vcpu{self.id}")

    def close(self) -> None:
        """Unmap kvm_run and close the fd; later access to kvm_run raises instead of
        touching unmapped memory."""
        self.kvm_run = _ClosedRun(self.id)
        self._run_compiled = None  # its fd and address are gone
        super().close()

    def __repr__(self) -> str:
        return f"<VcpuFd id={self.id} fd={self.fd}{' closed' if self.closed else ''}>"
