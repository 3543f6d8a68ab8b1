"""QEMU's `switch (run->exit_reason)` in `kvm_cpu_exec`: one decision per exit.

`handle_exit` is a pure function from a decoded exit to an `Outcome`, dispatching port I/O
and MMIO to the buses (QEMU: kvm_handle_io, address_space_rw), so tests feed it made-up
exits and the run loop (`runloop.VcpuRunner`) only carries the decision out.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from ..devices.bus import Bus, BusError
from ..kvm.exits import (Debug, Exit, FailEntry, Hlt, InternalError, Interrupted, IoIn, IoOut,
                         MmioRead, MmioWrite, Shutdown, SystemEvent, X86Rdmsr, X86Wrmsr)


class Action(enum.Enum):
    """After an exit: enter the guest again (KVM_RUN), or return to the caller."""
    RESUME = "resume"
    STOP = "stop"


RESUME, STOP = Action.RESUME, Action.STOP


@dataclass(slots=True, frozen=True)
class Outcome:
    """What the loop does with one exit."""
    action: Action
    device: str | None = None        # the device that handled it; for an unclaimed read,
                                     # what it returned (Bus.unassigned)
    reply: bytes | None = None       # bytes answering an IN or MMIO read
    stop_reason: str | None = None   # why the guest stopped, in words
    claimed: bool = True             # False: nobody owns that port/address
    # how the vCPU gets `reply` before it runs again: answer(vcpu, exit, reply)
    answer: Callable | None = None


def _answer_io_in(vcpu, exit: IoIn, reply: bytes) -> None:
    vcpu.complete_io_in(exit, reply)


def _answer_mmio_read(vcpu, exit: MmioRead, reply: bytes) -> None:
    vcpu.complete_mmio_read(exit, reply)


def _refuse_rdmsr(vcpu, exit: X86Rdmsr, reply: bytes) -> None:
    vcpu.complete_rdmsr(exit, int.from_bytes(reply, "little"), error=True)


_HLT = Outcome(STOP, stop_reason="HLT: the guest halted")
_INTERRUPTED = Outcome(RESUME, stop_reason="interrupted")
_UNCLAIMED = Outcome(RESUME, claimed=False)
# A write a device took needs no reply, so its outcome depends on the device's name alone:
# one shared object per name keeps the most frequent exits from allocating.
_TAKEN: dict[str, Outcome] = {}


def _taken(name: str) -> Outcome:
    return _TAKEN.setdefault(name, Outcome(RESUME, name))


def handle_exit(exit: Exit, pio: Bus, mmio: Bus) -> Outcome:
    """Route one exit to the device that owns the port or address (QEMU: kvm_handle_io,
    address_space_rw) and say whether the guest may go on. Accesses the guest could not
    have made (sizes, counts, lengths) raise `BusError`."""
    cls = exit.__class__
    if cls is IoOut:
        device = pio.pio_out(exit.port, exit.size, exit.count, exit.data)
        if device is None:
            return _UNCLAIMED
        return _TAKEN.get(device.name) or _taken(device.name)
    if cls is IoIn:
        data, device = pio.pio_in(exit.port, exit.size, exit.count)
        if device is None:
            return Outcome(RESUME, pio.unassigned, data, claimed=False, answer=_answer_io_in)
        return Outcome(RESUME, device.name, data, answer=_answer_io_in)
    if cls is MmioWrite:
        device = mmio.dispatch_write(exit.address, exit.value, _mmio_size(exit.length))
        if device is None:
            return _UNCLAIMED
        return _TAKEN.get(device.name) or _taken(device.name)
    if cls is MmioRead:
        size = _mmio_size(exit.length)
        value, device = mmio.dispatch_read(exit.address, size)
        reply = value.to_bytes(size, "little")[:exit.length]
        if device is None:
            return Outcome(RESUME, mmio.unassigned, reply, claimed=False,
                           answer=_answer_mmio_read)
        return Outcome(RESUME, device.name, reply, answer=_answer_mmio_read)
    if cls is Hlt:
        return _HLT
    if cls is Interrupted:
        return _INTERRUPTED
    if cls is Debug:
        return Outcome(STOP, stop_reason="debug exception")
    if cls is Shutdown:
        return Outcome(STOP, stop_reason="SHUTDOWN: triple fault, the vCPU cannot continue")
    if cls is FailEntry:
        return Outcome(STOP, stop_reason=f"FAIL_ENTRY: VM entry failed "
                                         f"(hardware reason {exit.hardware_entry_failure_reason:#x})")
    if cls is InternalError:
        return Outcome(STOP, stop_reason=f"INTERNAL_ERROR {exit.suberror_name}: the vCPU cannot go on")
    if cls is SystemEvent:
        return Outcome(STOP, stop_reason=f"SYSTEM_EVENT {exit.type_name}")
    if cls is X86Rdmsr:
        # No MSR is emulated in userspace: the loop answers with an error, so the guest
        # takes #GP as it would for an MSR the CPU lacks.
        return Outcome(RESUME, reply=bytes(8), claimed=False, answer=_refuse_rdmsr)
    if cls is X86Wrmsr:
        return _UNCLAIMED
    return Outcome(STOP, stop_reason=f"unhandled exit {exit.reason.name}")


def _mmio_size(length: int) -> int:
    """Devices take 1, 2, 4 or 8-byte accesses; an odd-length MMIO access is widened."""
    if not 1 <= length <= 8:
        raise BusError(f"MMIO access of {length} bytes: the CPU moves 1 to 8")
    return length if length in (1, 2, 4, 8) else (4 if length < 4 else 8)
