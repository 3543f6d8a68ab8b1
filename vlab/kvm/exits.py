"""Decoded VM exits: why KVM_RUN returned, as values.

`decode(run, mapping_size)` reads `struct kvm_run` after KVM_RUN and returns one of the
classes below, the Python counterpart of the `switch (run->exit_reason)` in QEMU's
`kvm_cpu_exec`. Fields the guest controls (`io.size`, `io.count`, `io.data_offset`,
`mmio.len`) are checked against the mapping before anything is sliced, so a hostile or
corrupt `kvm_run` gives `ExitDecodeError`, never a read outside the mapping.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .abi import KVM_EXIT_IO_OUT, ExitReason, InternalErrorSuberror, SystemEventType, ffi


class ExitDecodeError(ValueError):
    """`struct kvm_run` holds values that cannot describe a real exit."""


class Exit:
    """Base of every decoded exit; `reason` is the KVM_EXIT_* it came from."""
    __slots__ = ()
    reason: ClassVar[ExitReason]

    @property
    def name(self) -> str:
        return self.reason.name

    def describe(self) -> str:
        return self.reason.name


@dataclass(slots=True)
class OtherExit(Exit):
    """An exit with no payload vlab decodes (its reason is still named and numbered)."""
    reason: ExitReason


def _hex(data: bytes) -> str:
    return data.hex(" ") if len(data) <= 16 else data[:16].hex(" ") + " ..."


@dataclass(slots=True)
class IoOut(Exit):
    """`out`/`outs` to a port KVM does not emulate: `data` holds count*size bytes."""
    port: int = 0
    size: int = 1
    count: int = 1
    data: bytes = b""
    reason = ExitReason.IO

    @property
    def value(self) -> int:
        """The first (often the only) value written."""
        return int.from_bytes(self.data[:self.size], "little")

    def describe(self) -> str:
        rep = f" x{self.count}" if self.count > 1 else ""
        return f"IO out port {self.port:#x} size {self.size}{rep} data {_hex(self.data)}"


@dataclass(slots=True)
class IoIn(Exit):
    """`in`/`ins` from a port: userspace answers by writing count*size bytes at
    `data_offset` in kvm_run before the next KVM_RUN (VcpuFd.complete_io_in)."""
    port: int = 0
    size: int = 1
    count: int = 1
    data_offset: int = 0
    reason = ExitReason.IO

    def describe(self) -> str:
        rep = f" x{self.count}" if self.count > 1 else ""
        return f"IO in port {self.port:#x} size {self.size}{rep}"


@dataclass(slots=True)
class MmioWrite(Exit):
    """A store to guest-physical memory no slot backs (or a read-only slot)."""
    address: int = 0
    length: int = 0
    data: bytes = b""
    reason = ExitReason.MMIO

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")

    def describe(self) -> str:
        return f"MMIO write {self.address:#x} len {self.length} data {_hex(self.data)}"


@dataclass(slots=True)
class MmioRead(Exit):
    """A load from unbacked guest-physical memory: userspace supplies `length` bytes in
    kvm_run.mmio.data before the next KVM_RUN (VcpuFd.complete_mmio_read)."""
    address: int = 0
    length: int = 0
    reason = ExitReason.MMIO

    def describe(self) -> str:
        return f"MMIO read  {self.address:#x} len {self.length}"


@dataclass(slots=True)
class Hlt(Exit):
    """The guest executed HLT and no in-kernel irqchip holds it (KVM_EXIT_HLT)."""
    reason = ExitReason.HLT


@dataclass(slots=True)
class Shutdown(Exit):
    """Triple fault (or a shutdown cycle): the vCPU cannot continue."""
    reason = ExitReason.SHUTDOWN


@dataclass(slots=True)
class FailEntry(Exit):
    """VM entry failed; the reason code is the hardware's (VMX/SVM specific)."""
    hardware_entry_failure_reason: int = 0
    cpu: int = 0
    reason = ExitReason.FAIL_ENTRY

    def describe(self) -> str:
        return (f"FAIL_ENTRY hardware_entry_failure_reason={self.hardware_entry_failure_reason:#x}"
                f" cpu={self.cpu}")


@dataclass(slots=True)
class InternalError(Exit):
    """KVM itself could not go on, e.g. its instruction emulator met an unknown opcode."""
    suberror: int = 0
    data: tuple[int, ...] = ()
    insn_bytes: bytes = b""  # filled for EMULATION when the kernel reports them
    reason = ExitReason.INTERNAL_ERROR

    @property
    def suberror_name(self) -> str:
        try:
            return InternalErrorSuberror(self.suberror).name
        except ValueError:
            return f"UNKNOWN_{self.suberror}"

    def describe(self) -> str:
        words = " ".join(f"{d:#x}" for d in self.data)
        return f"INTERNAL_ERROR {self.suberror_name} data [{words}]"


@dataclass(slots=True)
class Debug(Exit):
    """A debug exception KVM_SET_GUEST_DEBUG asked to see (single-step, breakpoint)."""
    exception: int = 0
    pc: int = 0
    dr6: int = 0
    dr7: int = 0
    reason = ExitReason.DEBUG

    def describe(self) -> str:
        return f"DEBUG exception {self.exception} pc {self.pc:#x} dr6 {self.dr6:#x} dr7 {self.dr7:#x}"


@dataclass(slots=True)
class SystemEvent(Exit):
    """The guest asked for shutdown, reset or reported a crash (PSCI, etc.)."""
    type: int = 0
    data: tuple[int, ...] = ()
    reason = ExitReason.SYSTEM_EVENT

    @property
    def type_name(self) -> str:
        try:
            return SystemEventType(self.type).name
        except ValueError:
            return f"UNKNOWN_{self.type}"

    def describe(self) -> str:
        return f"SYSTEM_EVENT {self.type_name}"


@dataclass(slots=True)
class X86Rdmsr(Exit):
    """RDMSR forwarded to userspace (KVM_CAP_X86_USER_SPACE_MSR / MSR filter)."""
    index: int = 0
    msr_reason: int = 0
    reason = ExitReason.X86_RDMSR

    def describe(self) -> str:
        return f"RDMSR {self.index:#x}"


@dataclass(slots=True)
class X86Wrmsr(Exit):
    """WRMSR forwarded to userspace."""
    index: int = 0
    data: int = 0
    msr_reason: int = 0
    reason = ExitReason.X86_WRMSR

    def describe(self) -> str:
        return f"WRMSR {self.index:#x} <- {self.data:#x}"


@dataclass(slots=True)
class Hypercall(Exit):
    """A hypercall KVM hands to userspace (KVM_CAP_EXIT_HYPERCALL)."""
    nr: int = 0
    args: tuple[int, ...] = ()
    longmode: int = 0
    reason = ExitReason.HYPERCALL

    def describe(self) -> str:
        return f"HYPERCALL nr {self.nr}"


@dataclass(slots=True)
class Exception_(Exit):
    """KVM_EXIT_EXCEPTION: a guest exception userspace asked to see."""
    exception: int = 0
    error_code: int = 0
    reason = ExitReason.EXCEPTION


@dataclass(slots=True)
class Unknown(Exit):
    """KVM_EXIT_UNKNOWN: a hardware exit KVM does not handle."""
    hardware_exit_reason: int = 0
    reason = ExitReason.UNKNOWN

    def describe(self) -> str:
        return f"UNKNOWN hardware_exit_reason={self.hardware_exit_reason:#x}"


@dataclass(slots=True)
class TprAccess(Exit):
    rip: int = 0
    is_write: int = 0
    reason = ExitReason.TPR_ACCESS


@dataclass(slots=True)
class IoapicEoi(Exit):
    """End of interrupt for a level-triggered vector with a split irqchip."""
    vector: int = 0
    reason = ExitReason.IOAPIC_EOI


@dataclass(slots=True)
class Notify(Exit):
    flags: int = 0
    reason = ExitReason.NOTIFY


@dataclass(slots=True)
class Interrupted(Exit):
    """KVM_RUN returned early: a signal, `immediate_exit`, or KVM_EXIT_INTR. Not an error;
    the vCPU's state is intact and the next KVM_RUN resumes it."""
    reason = ExitReason.INTR


_FORMATS = {"uint8_t": "B", "uint16_t": "H", "uint32_t": "I", "uint64_t": "Q"}


def _fields_reader(*paths: tuple[str, ...]) -> tuple[int, struct.Struct]:
    """(offset, Struct) unpacking the named kvm_run fields, in order, in one call; the
    offsets and sizes are cffi's, from the declarations in abi.py."""
    spans = []
    for path in paths:
        ctype = ffi.typeof("struct kvm_run")
        for name in path:
            ctype = dict(ctype.fields)[name].type
        spans.append((ffi.offsetof("struct kvm_run", *path), _FORMATS[ctype.cname]))
    start = at = spans[0][0]
    layout = "<"
    for offset, code in spans:
        layout += (f"{offset - at}x" if offset > at else "") + code
        at = offset + struct.calcsize("<" + code)
    return start, struct.Struct(layout)


# exit_reason, then the union read as kvm_run.io: one unpack per exit.
_HEAD_AT, _HEAD = _fields_reader(("exit_reason",), *(("io", name) for name in (
    "direction", "size", "port", "count", "data_offset")))
_IO, _MMIO = int(ExitReason.IO), int(ExitReason.MMIO)
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")


def _bad_io(direction: int, size: int, count: int, offset: int,
            mapping_size: int) -> ExitDecodeError:
    if direction > KVM_EXIT_IO_OUT:
        return ExitDecodeError(f"kvm_run.io.direction is {direction}; it is 0 (in) or 1 (out)")
    if size not in (1, 2, 4):
        return ExitDecodeError(f"kvm_run.io.size is {size}; port I/O moves 1, 2 or 4 bytes")
    if count < 1:
        return ExitDecodeError(f"kvm_run.io.count is {count}; it must be at least 1")
    return ExitDecodeError(
        f"kvm_run.io.data_offset {offset:#x} with {count} x {size} bytes lies outside the "
        f"{mapping_size}-byte kvm_run mapping")


def decode(run, mapping_size: int, buffer) -> Exit:
    """Decode the exit in `run` (a `struct kvm_run *`); `buffer` is the mapping's bytes."""
    reason, direction, size, port, count, offset = _HEAD.unpack_from(buffer, _HEAD_AT)
    if reason == _IO:
        length = size * count
        if size not in (1, 2, 4) or count < 1 or offset + length > mapping_size \
                or direction > KVM_EXIT_IO_OUT:
            raise _bad_io(direction, size, count, offset, mapping_size)
        if direction:
            return IoOut(port, size, count, buffer[offset:offset + length])
        return IoIn(port, size, count, offset)
    if reason == _MMIO:
        mmio = run.mmio
        length = mmio.len
        if not 1 <= length <= 8:
            raise ExitDecodeError(f"kvm_run.mmio.len is {length}; an MMIO access moves 1 to 8 bytes")
        if mmio.is_write:
            data = buffer[_MMIO_DATA:_MMIO_DATA + length]
            return MmioWrite(mmio.phys_addr, length, data)
        return MmioRead(mmio.phys_addr, length)
    try:
        reason = ExitReason(reason)
    except ValueError:
        raise ExitDecodeError(f"kvm_run.exit_reason {reason} is not a KVM_EXIT_* value") from None
    decoder = _DECODERS.get(reason)
    return decoder(run) if decoder else OtherExit(reason)


def _internal(run) -> InternalError:
    internal = run.internal
    ndata = min(internal.ndata, 16)
    insn = b""
    if internal.suberror == InternalErrorSuberror.EMULATION and internal.ndata >= 2 \
            and run.emulation_failure.flags & 1:
        size = min(run.emulation_failure.insn_size, 15)
        insn = bytes(ffi.buffer(run.emulation_failure.insn_bytes, size))
    return InternalError(internal.suberror, tuple(internal.data[i] for i in range(ndata)), insn)


def _system_event(run) -> SystemEvent:
    event = run.system_event
    return SystemEvent(event.type, tuple(event.data[i] for i in range(min(event.ndata, 16))))


_DECODERS = {
    ExitReason.HLT: lambda run: Hlt(),
    ExitReason.SHUTDOWN: lambda run: Shutdown(),
    ExitReason.INTR: lambda run: Interrupted(),
    ExitReason.FAIL_ENTRY: lambda run: FailEntry(run.fail_entry.hardware_entry_failure_reason,
                                                 run.fail_entry.cpu),
    ExitReason.INTERNAL_ERROR: _internal,
    ExitReason.DEBUG: lambda run: Debug(run.debug.arch.exception, run.debug.arch.pc,
                                        run.debug.arch.dr6, run.debug.arch.dr7),
    ExitReason.SYSTEM_EVENT: _system_event,
    ExitReason.X86_RDMSR: lambda run: X86Rdmsr(run.msr.index, run.msr.reason),
    ExitReason.X86_WRMSR: lambda run: X86Wrmsr(run.msr.index, run.msr.data, run.msr.reason),
    ExitReason.HYPERCALL: lambda run: Hypercall(run.hypercall.nr, tuple(run.hypercall.args),
                                                run.hypercall.longmode),
    ExitReason.EXCEPTION: lambda run: Exception_(run.ex.exception, run.ex.error_code),
    ExitReason.UNKNOWN: lambda run: Unknown(run.hw.hardware_exit_reason),
    ExitReason.TPR_ACCESS: lambda run: TprAccess(run.tpr_access.rip, run.tpr_access.is_write),
    ExitReason.IOAPIC_EOI: lambda run: IoapicEoi(run.eoi.vector),
    ExitReason.NOTIFY: lambda run: Notify(run.notify.flags),
}
