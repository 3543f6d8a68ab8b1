"""The run loop: QEMU's `kvm_cpu_exec`, stepped, broken and stopped from a notebook.

`VcpuRunner` wraps one vCPU of any accelerator: `run()` until a stop condition, `step()` one
instruction, hardware breakpoints, and `stop()` from another thread or the notebook's stop
button. Every exit is recorded (`ExitLog`), with KVM's own counters since the previous exit,
so a learner sees how much the kernel handled between two exits that reached userspace.
On tcg, `run()` handles port I/O inside emulation as QEMU's TCG does (`dispatch_port_io`):
the same dispatch, records and stop conditions, without leaving Unicorn for each access.

On KVM the loop runs compiled where setup.py built `_runloop.c`: the same steps per exit,
with the debug console and unclaimed ports handled in C and every other exit handed to this
module's own handling (`_exit_from_compiled`); a run of exits to unclaimed ports goes on
without the GIL, which other threads (a widget's poller, the vCPUs' waiter) then hold
without taking it from the loop at every exit. `_run_python` is the loop to read; a
differential test (tests/kvm/test_runloop_compiled.py) holds the compiled one to it.
"""
from __future__ import annotations

import gc
import math
import signal
import struct
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..devices.bus import Bus, BusError
from ..kvm.abi import KVM_SYNC_X86_REGS, ExitReason, MpState
from ..kvm.exits import (Debug, Exit, ExitDecodeError, Hlt, Interrupted, IoIn, IoOut, MmioRead,
                         MmioWrite)
from .console import Console
from .exitlog import IO_IN, IO_OUT, MAX_COUNTERS, ExitLog, ExitRecord
from .dispatch import RESUME, STOP, Outcome, handle_exit
from .explain import explain
from .snapshot import RegisterSnapshot
from ..x86 import HW_BREAKPOINTS, RFLAGS_IF
from ..devices.debugcon import DebugConsole
from ..devices.uart16550 import Uart16550

try:   # the compiled loop (setup.py builds it where it can); else the Python loop runs
    from . import _runloop
except ImportError:
    _runloop = None

# KVM's vCPU counters worth showing next to each userspace exit (names from the stats fd).
KERNEL_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits",
                   "insn_emulation", "insn_emulation_fail", "signal_exits", "request_irq_exits",
                   "halt_wakeup", "irq_injections", "nmi_injections", "pf_taken", "hypercalls")

@dataclass
class RunResult:
    """How a `run()` ended."""
    stop_reason: str
    exits: int                        # userspace exits during this run
    seconds: float
    last_exit: Exit | None
    rip: int
    explanation: str | None = None    # what a fatal exit (SHUTDOWN, FAIL_ENTRY...) means

    def __str__(self) -> str:
        text = (f"stopped: {self.stop_reason} after {self.exits} exits in {self.seconds:.3f} s, "
                f"RIP={self.rip:#x}")
        return f"{text}\n{self.explanation}" if self.explanation else text


@dataclass
class StepResult:
    """One instruction: the register snapshots before and after, and what changed."""
    before: "RegisterSnapshot"
    after: "RegisterSnapshot"
    exit: Exit
    outcome: Outcome
    changed: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def rip_before(self) -> int:
        return self.before.regs.rip

    @property
    def rip_after(self) -> int:
        return self.after.regs.rip

    def __str__(self) -> str:
        changes = ", ".join(f"{k} {a:#x}->{b:#x}" for k, a, b in
                            ((k, *v) for k, v in self.changed.items()))
        return f"{self.rip_before:#x} -> {self.rip_after:#x} [{self.exit.describe()}] {changes}"


_HLT_OPCODE = 0xF4
# devices the compiled loop handles itself, by class: their PORT_* code in _runloop.c
_COMPILED_DEVICES = {DebugConsole: 2, Uart16550: 3}
# how _runloop.run() ended (its STOP_* codes)
_STOP_REQUESTED, _STOP_SLOW, _STOP_UNTIL, _STOP_PREDICATE, _STOP_MAX_EXITS, _STOP_ERRNO = range(1, 7)
STOP_GRACE = 2.0  # seconds for a stopped run to return (a kicked vCPU to leave KVM_RUN)
_clock = time.perf_counter
_TRANSFERS = (IoIn, IoOut, MmioRead, MmioWrite)  # completed by the KVM_RUN after their exit
_LISTENING = (True,)   # listeners that never leave: the Python loop runs to the end


def _sink(device) -> tuple:
    """Where the compiled loop sends a device's bytes: its Console's write, chunks and
    listeners (Console.write's own steps), or nowhere."""
    output = getattr(device, "_output", None)
    if output is None:
        return None, [], []
    return output, output.__self__._chunks, output.__self__.listeners


def _until_kinds(until) -> int:
    """The row kinds (_runloop.c's bits) of the port I/O that `until` stops at."""
    return sum(1 << kind for kind, cls in ((IO_OUT, IoOut), (IO_IN, IoIn))
               if until is not None and (until == cls.reason if isinstance(until, int)
                                         else issubclass(cls, until)))


def _undecodable(error: ExitDecodeError) -> str:
    return f"KVM reported an exit that cannot be decoded: {error}"


class StopFlag:
    """`threading.Event`'s set, clear and is_set without its lock: the Ctrl-C handler sets
    it in the main thread, possibly while the code it interrupted is inside set() or
    clear() of the same flag, where an Event's lock would deadlock. The flag is the one
    byte of `cell`, which the compiled loop reads between two KVM_RUNs without a call."""

    __slots__ = ("cell",)

    def __init__(self):
        self.cell = bytearray(1)

    def set(self) -> None:
        self.cell[0] = 1

    def clear(self) -> None:
        self.cell[0] = 0

    def is_set(self) -> bool:
        return self.cell[0] == 1


class VcpuBusy(RuntimeError):
    """Another caller runs this vCPU (a widget's background run, another thread)."""


class VcpuHalted(RuntimeError):
    """The vCPU sleeps in the kernel (in-kernel irqchip): a step would wait in KVM_RUN."""


class VcpuClosed(RuntimeError):
    """The vCPU was closed."""


class VcpuStuckError(RuntimeError):
    """A stopped run did not return (a kicked vCPU did not leave KVM_RUN); its fds must
    stay open."""


class Ownership:
    """Who runs a vCPU (or all of a Lab's) now: one owner at a time, as KVM's vCPU mutex
    allows one KVM_RUN and Unicorn one emulation. Another caller gets `VcpuBusy` at once,
    instead of blocking in the kernel (kvm) or entering the engine twice (tcg); the owner's
    own thread may claim again (a run steps over a breakpoint). `close()` stops the owner,
    waits for it, and refuses every later claim with `closed()`."""

    def __init__(self, name: str, closed: Callable[[], Exception]):
        self.name = name
        self._closed = closed
        self._lock = threading.RLock()
        self._holder: tuple[str, str, float] | None = None   # what, thread name, since
        self.closed = False

    @property
    def holder(self) -> str | None:
        """What holds it now (e.g. "run()"), or None."""
        holder = self._holder
        return holder[0] if holder else None

    @contextmanager
    def claim(self, what: str):
        if self.closed:
            raise self._closed()
        if not self._lock.acquire(blocking=False):
            holder = self._holder or (what, "another thread", time.monotonic())
            raise VcpuBusy(f"{self.name} is busy: {holder[0]} has been running in thread "
                           f"{holder[1]!r} for {time.monotonic() - holder[2]:.1f} s; stop() "
                           "ends it (lab.stop(), or the stop button), or wait until it returns")
        outer = self._holder is None
        try:
            if self.closed:   # closed while this caller waited for the lock
                raise self._closed()
            if outer:
                self._holder = (what, threading.current_thread().name, time.monotonic())
            yield
        finally:
            if outer:
                self._holder = None
            self._lock.release()

    def close(self, stop: Callable[[], None], grace: float = STOP_GRACE) -> None:
        """Call `stop()` until the owner has returned (again and again: a run that began
        after one stop starts afresh), then refuse every claim."""
        deadline = time.monotonic() + grace
        while not self._lock.acquire(blocking=False):
            stop()
            if self._lock.acquire(timeout=0.01):
                break
            if time.monotonic() > deadline:
                raise VcpuStuckError(f"{self.name}: {self.holder} did not return within "
                                     f"{grace} s of being stopped")
        self.closed = True
        self._lock.release()


def check_run_options(until=None, predicate=None, max_exits=None, timeout=None) -> None:
    """Refuse a run's bad options at the call, before anything runs (a timer thread that
    died of a TypeError would leave a spinning guest running for ever)."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise (ValueError if isinstance(timeout, (int, float)) else TypeError)(
            f"timeout={timeout!r}: give a number of seconds greater than 0 (or None)")
    if max_exits is not None and (isinstance(max_exits, bool) or not isinstance(max_exits, int)
                                  or max_exits < 1):
        raise (ValueError if isinstance(max_exits, int) else TypeError)(
            f"max_exits={max_exits!r}: give a whole number of exits, 1 or more (or None)")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate={predicate!r}: give a function of an ExitRecord (or None)")
    if until is not None and not isinstance(until, int) and not (
            isinstance(until, type) and issubclass(until, Exit)):
        raise TypeError(f"until={until!r}: give an ExitReason or an exit class "
                        "(e.g. vlab.kvm.Hlt), or None")


class VcpuRunner:
    """Runs one vCPU against the machine's buses and records every exit.

    `read_code(address, size)` reads guest code by linear address (identity-mapped guests:
    physical memory); `backend` (a `vlab.kvm.Backend`) tunes the explanations of fatal exits.
    """

    def __init__(self, vcpu, pio: Bus, mmio: Bus, *, read_code: Callable[[int, int], bytes] | None = None,
                 log: ExitLog | None = None, kernel_counters: bool = True, backend=None,
                 inline_port_io: bool = False):
        self.vcpu = vcpu
        self.inline_port_io = inline_port_io   # the accelerator's capability (tcg has it)
        self.pio, self.mmio = pio, mmio
        self.log = log if log is not None else ExitLog()
        self.read_code = read_code
        self.backend = backend
        self.breakpoints: tuple[int, ...] = ()
        self.stop_requested = StopFlag()
        self.ownership = Ownership(f"vCPU {vcpu.id}", lambda: VcpuClosed(f"vCPU {vcpu.id} is closed"))
        self._stop_cause = "stopped"
        vcpu.enable_sync_regs(KVM_SYNC_X86_REGS)  # RIP per exit without a GET_REGS ioctl
        self.halted = False
        self._thread: int | None = None
        self._armed = False
        self._conditions = (None, None, None)  # until, predicate, max_exits of the run
        self._exits = 0                        # guest exits in the run so far
        self._resumed = 0.0                    # when the guest last resumed
        self._inline_exit = self._inline_outcome = self._inline_stop = None
        # A vlab.kvm.KernelTrace: each record then carries its KVM_RUN's kernel events
        self.kernel_trace = None
        self._since = 0                        # the trace clock when the guest last entered
        self._stats = None
        self._counters = None
        if kernel_counters:
            try:
                self._stats = vcpu.get_stats_fd()
            except (OSError, NotImplementedError, AttributeError):
                self._stats = None
        if self._stats is not None:
            self.counter_names, read = self._stats.selector(KERNEL_COUNTERS)
            self._counters = read if self.counter_names else None
        else:
            self.counter_names = ()
        if not self.log.counter_names:
            self.log.counter_names = self.counter_names
        self._previous_counters = self._read_counters()

    # -- kernel counters --------------------------------------------------------------------
    def _read_counters(self) -> tuple[int, ...] | None:
        if self._counters is None:
            return None
        return self._counters()

    def kernel_counters(self) -> dict[str, int]:
        """KVM's counters for this vCPU now (all of them, by name)."""
        return self._stats.read() if self._stats is not None else {}

    # -- one exit ---------------------------------------------------------------------------
    def _enter(self) -> tuple[Exit, Outcome]:
        """KVM_RUN once, handle the exit, record it: the body of kvm_cpu_exec's loop."""
        self._resumed = start = _clock()
        if self.kernel_trace is not None:
            self._since = self.kernel_trace.now()
        exit = self.vcpu.run()
        if exit is self._inline_exit:  # handled in run(), by _on_port_io
            return exit, self._inline_outcome
        return exit, self._handle(exit, _clock() - start, self._read_counters())

    def _on_port_io(self, exit: IoIn | IoOut) -> bool:
        """Port I/O inside tcg's emulation: handled and recorded as an exit, and checked
        against the run's stop conditions; True stops the guest after this access."""
        outcome = self._handle(exit, _clock() - self._resumed, self._read_counters())
        stop_reason = self._check_exit(exit, outcome)
        self._resumed = _clock()
        if stop_reason is None:
            return False
        self._inline_exit, self._inline_outcome, self._inline_stop = exit, outcome, stop_reason
        return True

    def _handle(self, exit: Exit, duration: float, counters: tuple[int, ...] | None) -> Outcome:
        """Dispatch one exit to its device, complete it, record it with KVM's counters read
        after it."""
        vcpu = self.vcpu
        try:
            outcome = handle_exit(exit, self.pio, self.mmio)
        except BusError as e:
            outcome = Outcome(STOP, stop_reason=f"bad access from the guest ({exit.describe()}): {e}")
        if outcome.answer is not None:
            outcome.answer(vcpu, exit, outcome.reply)
        record = ExitRecord(vcpu.id, exit, vcpu.synced_rip, outcome.device, outcome.claimed,
                            duration, self._previous_counters, counters)
        if self.kernel_trace is not None:
            record.kernel_events = self.kernel_trace.take(threading.get_native_id(), self._since)
        self.log.append(record)
        self._previous_counters = counters
        return outcome

    def _check_exit(self, exit: Exit, outcome: Outcome) -> str | None:
        """Count a guest exit of `run()` and say why the run stops there, if it does."""
        self._exits += 1
        until, predicate, max_exits = self._conditions
        if outcome.action is STOP:
            return self._stop_reason(exit, outcome)
        if until is not None and (exit.reason == until if isinstance(until, int)
                                  else isinstance(exit, until)):
            return f"reached {exit.describe()}"
        if predicate is not None and predicate(self.log.last):
            return "predicate matched"
        if max_exits is not None and self._exits >= max_exits:
            return f"max_exits={max_exits} reached"
        return None

    # -- running ------------------------------------------------------------------------------
    def run(self, *, until: ExitReason | type | None = None,
            predicate: Callable[[ExitRecord], bool] | None = None,
            max_exits: int | None = None, timeout: float | None = None) -> RunResult:
        """Run until HLT, a fatal exit, a breakpoint, `until` (an ExitReason or exit class),
        `predicate(record)`, `max_exits`, `timeout` seconds, or `stop()` / Ctrl-C. One
        caller at a time: another gets `VcpuBusy`."""
        check_run_options(until, predicate, max_exits, timeout)
        with self.ownership.claim("run()"):
            return self._run(until, predicate, max_exits, timeout)

    @property
    def busy(self) -> str | None:
        """What runs this vCPU now ("run()", "step()"...), or None."""
        return self.ownership.holder

    @contextmanager
    def armed(self):
        """Forget an earlier stop() on entry, not when the next run() begins: within the
        block a stop() stops that run even if it comes before run() does (the Lab arms
        its vCPUs as its run() begins, run_vcpus before their threads start). Nested
        blocks keep what the outer one has seen."""
        if not self._armed:
            self.stop_requested.clear()
            self._stop_cause = "stopped"
            self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _run(self, until, predicate, max_exits, timeout) -> RunResult:
        if not self._armed:
            self.stop_requested.clear()   # a stop() from before this run is not for it
            self._stop_cause = "stopped"
        self._armed = False
        self._thread = threading.get_ident()
        self.halted = False
        timer = (threading.Timer(timeout, self.stop, (f"timeout after {timeout} s",))
                 if timeout is not None else None)
        self._conditions = (until, predicate, max_exits)
        self._exits = 0
        self._inline_exit = None
        exit: Exit | None = None
        stop_reason = None
        started = time.perf_counter()
        # tcg: no exit needs to leave emulation for port I/O (KVM has no such choice)
        dispatch_port_io = self.vcpu.dispatch_port_io if self.inline_port_io else None
        # The exit path makes no reference cycles; without this the cyclic collector would
        # rescan the log's live records over and over (about 1.8 us per exit at 100,000).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        with SIGINT.stops((self,)):
            if timer:
                timer.start()
            if dispatch_port_io is not None:
                dispatch_port_io(self._on_port_io, self._inline_port_io())
            try:
                if self.breakpoints and self.vcpu.get_regs().rip in self.breakpoints:
                    # Resuming at a breakpoint would hit it again at once: step over it
                    # first, as QEMU's gdbstub does.
                    stepped = self.step()
                    exit, self._exits = stepped.exit, 1
                    if exit.__class__ is not Debug and stepped.outcome.action is STOP:
                        stop_reason = self._stop_reason(exit, stepped.outcome)
                if stop_reason is None and self.loop == "compiled":
                    exit, stop_reason = self._run_compiled(exit)
                elif stop_reason is None:
                    exit, stop_reason = self._run_python(exit, self._hand_over())
                    if stop_reason is None:   # nobody records the ioctls now: the rest in C
                        exit, stop_reason = self._run_compiled(exit)
            except ExitDecodeError as e:
                stop_reason = _undecodable(e)
            finally:
                if dispatch_port_io is not None:
                    dispatch_port_io(None)
                if timer:
                    timer.cancel()
                self._thread = None
                if gc_was_enabled:
                    gc.enable()
        explanation = (explain(exit, self.vcpu, self.read_code, self.backend)
                       if exit is not None else None)
        return RunResult(stop_reason, self._exits, time.perf_counter() - started, exit,
                         self.vcpu.get_regs().rip, explanation)

    def _run_python(self, exit: Exit | None, listening: Sequence = _LISTENING
                    ) -> tuple[Exit | None, str | None]:
        """kvm_cpu_exec's loop: enter the guest, handle its exit, until a stop condition.
        Returns the last exit and why the loop stopped: None when `listening` (the ioctl
        listeners, see `_hand_over`) has emptied, for the compiled loop to go on."""
        enter, stopping = self._enter, self.stop_requested.is_set
        try:
            while True:
                if stopping():
                    return exit, self._stop_cause
                if not listening:
                    return exit, None
                exit, outcome = enter()
                if exit.__class__ is Interrupted:
                    continue  # a kick, not an exit the guest caused
                if exit is self._inline_exit:
                    return exit, self._inline_stop
                stop_reason = self._check_exit(exit, outcome)
                if stop_reason is not None:
                    return exit, stop_reason
        except ExitDecodeError as e:
            return exit, _undecodable(e)

    # -- the compiled loop ----------------------------------------------------------------------
    @property
    def loop(self) -> str:
        """Which loop `run()` takes: "compiled" (_runloop.c) or "python" (`_run_python`).
        The compiled one runs a KVM vCPU whose ioctls and kernel events are not traced, into
        a log that keeps this runner's counters; a run that begins in Python while the
        ioctls are recorded goes on in C once their listeners have left (`_hand_over`)."""
        return "compiled" if self._compilable() and not self.vcpu.tracer.listeners else "python"

    def _compilable(self) -> bool:
        """Whether the compiled loop can run this vCPU while nobody records its ioctls."""
        from ..kvm.vcpu import VcpuFd
        return self._c_records() and isinstance(self.vcpu, VcpuFd)

    def _c_records(self) -> bool:
        """Whether _runloop.c can write this runner's records: it is built, no kernel trace
        is taken per exit, and the log keeps this runner's counters, as many as a row holds."""
        return (_runloop is not None and self.kernel_trace is None
                and self.log.counter_names == self.counter_names
                and len(self.counter_names) <= MAX_COUNTERS)

    def _hand_over(self) -> Sequence:
        """What `_run_python` watches: the tracer's listeners (the same list, emptied in
        place as they leave) where the compiled loop could go on without them, as it does
        once a Lab's kvm_cpu_exec record has kept its first ioctls; else never empty."""
        return self.vcpu.tracer.listeners if self._compilable() else _LISTENING

    def _fast_ports(self) -> tuple[bytes, dict[type, tuple[int, object]]]:
        """Each port's handling in the compiled loop as the run begins (_runloop.c's PORT_*
        codes): nobody's (unclaimed), the debug console's, the 16550's, or Python's (every
        other device); and the first debug console and 16550, by class, with their base
        port, whose output goes to a Console (or nowhere), which C appends to as its write
        does."""
        table = bytearray(b"\x01") * 0x10000                   # PORT_UNCLAIMED
        handled: dict[type, tuple[int, object]] = {}
        for base, end, _ in self.pio.mappings():
            device, _ = self.pio.find(base)
            output = getattr(device, "_output", None)
            fast = (type(device) in _COMPILED_DEVICES and type(device) not in handled
                    and (output is None or getattr(output, "__func__", None) is Console.write))
            table[base:end] = bytes((_COMPILED_DEVICES[type(device)] if fast else 0,)) * (end - base)
            if fast:
                handled[type(device)] = (base, device)
        return bytes(table), handled

    def _fast_devices(self) -> tuple:
        """The arguments _runloop.c's run() and InlinePortIo share, after their own: the port
        table, the debug console's buffer and sink, the 16550, its sink and base port, and
        the log's numbers for the debug console, unclaimed ports and the 16550."""
        ports, handled = self._fast_ports()
        _, debugcon = handled.get(DebugConsole, (0, None))
        uart_base, uart = handled.get(Uart16550, (0, None))
        number = self.log.device_number
        return (ports, debugcon._data if debugcon else bytearray(), _sink(debugcon),
                uart, _sink(uart), uart_base,
                (number(debugcon.name if debugcon else None), number(self.pio.unassigned),
                 number(uart.name if uart else None)))

    def _inline_port_io(self):
        """`_on_port_io` in C for the devices the compiled loop handles (_runloop.c's
        InlinePortIo), which tcg's C hooks call first; None where this run needs Python for
        every access: no compiler, a predicate, a kernel trace, a log that keeps other
        counters, counters a vCPU's list does not hold (KVM's)."""
        indices = getattr(self._stats, "indices", None)
        until, predicate, max_exits = self._conditions
        if (not self._c_records() or predicate is not None
                or (self._counters is not None and indices is None)):
            return None
        *devices, numbers = self._fast_devices()
        return _runloop.InlinePortIo(
            self, bytes(indices(self.counter_names) if self._counters is not None else ()),
            *devices, self.log, max_exits or 0, _until_kinds(until), self.vcpu.id, *numbers)

    def _run_compiled(self, exit: Exit | None) -> tuple[Exit | None, str]:
        """`_run_python`'s loop in C (_runloop.c); exits it does not handle itself come to
        `_exit_from_compiled`."""
        from ..kvm.abi import ffi
        from ..kvm.errors import KvmError
        vcpu, log, stats = self.vcpu, self.log, self._stats
        until, predicate, max_exits = self._conditions
        offsets, stats_fd, data_offset, length = stats.layout(self.counter_names) \
            if self._counters is not None else ((), -1, 0, 0)
        *devices, numbers = self._fast_devices()
        self._slow_exit = exit
        first_slow = (self._counters is not None
                      and not log.continues(vcpu.id, self._previous_counters))
        appended = log.total
        try:
            code, value, self._exits, last_seq, counters = _runloop.run(
                vcpu.fd, int(ffi.cast("uintptr_t", vcpu.kvm_run)), vcpu.mmap_size, stats_fd,
                data_offset, length, struct.pack(f"{len(offsets)}I", *offsets),
                self._previous_counters, *devices,
                log, self.stop_requested, max_exits or 0, _until_kinds(until), predicate,
                self._exit_from_compiled, self._exits, vcpu.id, *numbers, first_slow)
        except ExitDecodeError as e:   # raised by _exit_from_compiled, the exit before it kept
            self._count_runs(log.total - appended + 1)
            return self._slow_exit, _undecodable(e)
        self._count_runs(log.total - appended + (code == _STOP_ERRNO))
        if counters is not None:
            self._previous_counters = counters
        exit = log.record(last_seq).exit if last_seq else self._slow_exit
        if code == _STOP_ERRNO:
            raise KvmError(value, "RUN", detail=f"vCPU {vcpu.id} is closed" if vcpu.closed else None)
        if code == _STOP_UNTIL:
            return exit, f"reached {exit.describe()}"
        return exit, {_STOP_REQUESTED: self._stop_cause, _STOP_SLOW: value,
                      _STOP_PREDICATE: "predicate matched",
                      _STOP_MAX_EXITS: f"max_exits={max_exits} reached"}[code]

    def _count_runs(self, runs: int) -> None:
        """Add the compiled loop's KVM_RUNs to the tracer's count of ioctls: one per record
        it appended (the log is this vCPU's alone in a Lab) and one for a KVM_RUN that
        failed or whose exit could not be decoded."""
        self.vcpu.tracer.issued += runs

    def _exit_from_compiled(self, duration: float, before, after, exits: int,
                            interrupted: bool) -> tuple[str | None, int]:
        """An exit the compiled loop leaves to Python, handled as `_run_python` handles it,
        with the KVM_RUN time and counters the loop measured. Returns the stop reason (or
        None) and the guest exits counted so far."""
        self._exits = exits
        exit = Interrupted() if interrupted else self.vcpu.decode_exit()
        self._previous_counters, self._slow_exit = before, exit
        outcome = self._handle(exit, duration, after)
        if exit.__class__ is Interrupted:
            return None, exits
        return self._check_exit(exit, outcome), self._exits

    def _stop_reason(self, exit: Exit, outcome: Outcome) -> str:
        if exit.__class__ is Debug:
            hit = [i for i in range(HW_BREAKPOINTS) if exit.dr6 & (1 << i)]
            if hit and hit[0] < len(self.breakpoints):
                return f"breakpoint {hit[0]} at {self.breakpoints[hit[0]]:#x}"
            return f"debug exception {exit.exception} at {exit.pc:#x}"
        if exit.__class__ is Hlt:
            self.halted = True
        return outcome.stop_reason

    def stop(self, cause: str = "stopped") -> None:
        """Stop a `run()` in progress, from any thread (the notebook's stop button, a timer).
        The exit being handled is finished first, so nothing is lost and `run()` resumes.
        A closed vCPU runs nothing: stopping it does nothing."""
        if self.ownership.closed:
            return
        self._stop_cause = cause
        self.stop_requested.set()
        try:
            self.vcpu.kick(self._thread)
        except Exception:
            if not self.vcpu.closed:   # else closed meanwhile: nothing left to stop
                raise

    # -- stepping -----------------------------------------------------------------------------
    def set_breakpoints(self, addresses) -> None:
        """Up to four hardware execution breakpoints (DR0-DR3), by linear address."""
        addresses = tuple(addresses)
        if len(addresses) > 4:
            raise ValueError(f"{len(addresses)} breakpoints; x86 has four debug address "
                             "registers (DR0-DR3)")
        self.vcpu.set_guest_debug(enable=bool(addresses), hw_breakpoints=addresses)
        self.breakpoints = addresses

    def _at_hlt(self, regs, sregs) -> bool:
        if self.read_code is None:
            return False
        try:
            return self.read_code(sregs.cs.base + regs.rip, 1)[0] == _HLT_OPCODE
        except (ValueError, IndexError):
            return False

    def _guest_exit(self) -> tuple[Exit, Outcome]:
        """The next exit the guest causes: a pending kick's `Interrupted` is no step."""
        while True:
            exit, outcome = self._enter()
            if exit.__class__ is not Interrupted:
                return exit, outcome

    def _check_awake(self) -> None:
        """With the in-kernel irqchip a halted vCPU sleeps in KVM (KVM_MP_STATE_HALTED), and
        an AP waits there for INIT/SIPI: KVM_RUN would not return until an event (or a
        signal) woke it, so a step of it is refused. On tcg HLT always exits, as without
        the irqchip on KVM, and the vCPU has no such state."""
        get_mp_state = getattr(self.vcpu, "get_mp_state", None)
        if get_mp_state is None:
            return
        state = MpState(get_mp_state())
        if state is MpState.RUNNABLE:
            return
        where = f"vCPU {self.vcpu.id} is {state.name.lower()} (KVM_MP_STATE_{state.name})"
        if state is not MpState.HALTED:
            raise VcpuHalted(f"{where}: an application processor waits for the INIT and "
                             "SIPI the bootstrap processor sends; nothing to step until then")
        if self.vcpu.get_regs().rflags & RFLAGS_IF:
            raise VcpuHalted(f"{where} and waits for an interrupt (IF=1): run() lets it take "
                             "one; a step would wait in KVM_RUN until one comes")
        raise VcpuHalted(f"{where} with interrupts off (IF=0): only an NMI, INIT or reset "
                         "wakes it, so no instruction can run; restore() a snapshot or "
                         "start a new Lab")

    def step(self) -> StepResult:
        """Execute one instruction (KVM_SET_GUEST_DEBUG single-step) and say what changed.

        A HLT is run without single-step, which exits as HLT on every backend, as in `run()`:
        single-stepped, it exits as HLT on VMX and SVM but kvm_pvm steps over it like a NOP
        (`Backend.single_step_reports_hlt`) and the guest runs into what follows. Code is
        read at CS.base + RIP, which assumes identity-mapped paging. A vCPU asleep in the
        kernel is not stepped (`VcpuHalted`); another caller's run gives `VcpuBusy`."""
        with self.ownership.claim("step()"):
            self._check_awake()
            return self._step()

    def _step(self) -> StepResult:
        before = RegisterSnapshot.capture(self.vcpu)
        self.halted = False
        at_hlt = self._at_hlt(before.regs, before.sregs)
        self.vcpu.set_guest_debug(enable=not at_hlt, single_step=not at_hlt)
        try:
            exit, outcome = self._guest_exit()
            if exit.__class__ in _TRANSFERS and outcome.action is RESUME:
                # The I/O completes on the next KVM_RUN. With immediate_exit set, KVM finishes
                # it and returns before running anything else: kvm_pvm would otherwise run
                # the following instruction too before reporting the step. On VMX and SVM,
                # finishing it completes the single-step: KVM_RUN returns DEBUG, not EINTR,
                # and immediate_exit is still set.
                self.vcpu.kick()
                self._enter()
                self.vcpu.immediate_exit = False
        finally:
            self.vcpu.set_guest_debug(enable=bool(self.breakpoints), hw_breakpoints=self.breakpoints)
        if exit.__class__ is Hlt:
            self.halted = True
        after = RegisterSnapshot.capture(self.vcpu)
        return StepResult(before, after, exit, outcome, before.diff(after))

    def close(self) -> None:
        """Stop a run in progress and wait for it to return, then release KVM's counters."""
        self.ownership.close(lambda: self.stop("the vCPU was closed"))
        if self._stats is not None:
            self._stats.close()
            self._stats = None
            self._counters = None


class _SigintStops:
    """Ctrl-C (the notebook's stop button) stops the runs in progress, in any thread, instead
    of raising KeyboardInterrupt in the middle of an exit. Only the main thread can take
    SIGINT: a run there (or `held()`) installs the handler for as long as it lasts; runs
    in other threads are stopped by it too. Within `held()` (a command line's whole
    command), a Ctrl-C after one that stopped a guest changes nothing: what is left to do
    is report how the guest ended. Outside any run, Ctrl-C raises KeyboardInterrupt."""

    CAUSE = "interrupted by Ctrl-C"

    def __init__(self):
        # Replaced, never changed in place, under _lock; the handler reads it without the
        # lock, which the code it interrupts may hold.
        self._stopping: tuple[_Stopping, ...] = ()
        self._lock = threading.Lock()
        self._depth = 0
        self._previous = None
        self._handling = False
        self.interrupted = False   # a Ctrl-C stopped a run since the handler was installed

    @contextmanager
    def stops(self, runners: Sequence[VcpuRunner]):
        """While in this block, Ctrl-C stops `runners`; the `_Stopping` it gives says
        whether it did."""
        stopping = _Stopping(tuple(runners))
        with self._lock:
            self._stopping += (stopping,)
        installed = self._install()
        try:
            yield stopping
        finally:
            with self._lock:
                self._stopping = tuple(s for s in self._stopping if s is not stopping)
            if installed:
                self._uninstall()

    @contextmanager
    def held(self):
        """Keep the handler for the whole block (see the class's docstring)."""
        installed = self._install()
        try:
            yield self
        finally:
            if installed:
                self._uninstall()

    def _install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        self._depth += 1
        if self._depth == 1:
            self.interrupted = False
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return True

    def _uninstall(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum, frame):
        if self._handling:   # a Ctrl-C within the handling of the one before
            return
        self._handling = True
        try:
            stopping = self._stopping
            if stopping:
                self.interrupted = True
                for each in stopping:
                    each.interrupted = True
                    for runner in each.runners:
                        runner.stop(self.CAUSE)
            elif not self.interrupted:
                raise KeyboardInterrupt
        finally:
            self._handling = False


@dataclass
class _Stopping:
    runners: tuple[VcpuRunner, ...]
    interrupted: bool = False


SIGINT = _SigintStops()


class _VcpuThread(threading.Thread):
    """One vCPU's `VcpuRunner.run()` in its own thread, named as QEMU names it
    ("CPU 0/KVM"). `finished` is set when run() has returned: an Event, since a join
    interrupted by Ctrl-C may leave CPython taking the thread for stopped."""

    def __init__(self, runner: VcpuRunner, accel: str, options: dict, any_finished: threading.Event):
        super().__init__(name=f"CPU {runner.vcpu.id}/{accel.upper()}", daemon=True)
        self.runner = runner
        self.options = options
        self.any_finished = any_finished
        self.finished = threading.Event()
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.finished_at = math.inf   # monotonic time run() returned

    def run(self) -> None:
        try:
            self.result = self.runner.run(**self.options)
        except BaseException as e:  # re-raised by run_vcpus once every vCPU has stopped
            self.error = e
        finally:
            self.finished_at = time.monotonic()
            self.finished.set()
            self.any_finished.set()


# How a run of every vCPU ended (run_vcpus): a vCPU stopped, time ran out, Ctrl-C.
BY_VCPU, BY_TIMEOUT, BY_INTERRUPT = "vcpu", "timeout", "interrupt"


@dataclass
class VcpusRun:
    """What `run_vcpus` saw: each vCPU's RunResult, in order, and how and why it ended."""
    results: list[RunResult]
    ended_by: str
    reason: str


def run_vcpus(runners: Sequence[VcpuRunner], accel: str, options: dict | None = None, *,
              first_stops_all: bool = False, timeout: float | None = None) -> VcpusRun:
    """Run every vCPU in its own thread, as QEMU's vCPU threads, each `runner.run(**options)`;
    return when all have stopped. Ctrl-C in the caller's thread stops them all; so does
    `timeout` (seconds of the whole run) and, with `first_stops_all` (a machine whose
    vCPUs sleep in the kernel), the first vCPU to stop. A vCPU's exception is raised once
    all have stopped; `VcpuStuckError` if one does not stop within STOP_GRACE of it."""
    from ..kvm.vcpu import VcpuFd, install_kick_handler
    options = options or {}
    check_run_options(**options)
    # KVM's vCPUs leave KVM_RUN for a signal; tcg's are stopped without one
    if any(isinstance(r.vcpu, VcpuFd) for r in runners) and not install_kick_handler():
        raise RuntimeError("run_vcpus must first be called from the main thread, which alone "
                           "can install the signal handler that kicks vCPUs out of KVM_RUN")
    any_finished = threading.Event()
    threads = [_VcpuThread(runner, accel, options, any_finished) for runner in runners]
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    ended_by = reason = None
    with contextlib.ExitStack() as armed, SIGINT.stops(runners) as interrupts:
        for runner in runners:
            armed.enter_context(runner.armed())
        # The vCPU threads start with SIGINT blocked, as QEMU's start with signals blocked:
        # Ctrl-C reaches the thread that waits here, and stops them through SIGINT.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for thread in threads:
                thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        while ended_by is None:
            # short waits: a Ctrl-C delivered to another (non-vCPU) thread is handled here;
            # cleared before the threads are looked at, so a vCPU finishing later wakes it
            any_finished.wait(min(0.05, max(deadline - time.monotonic(), 0)))
            any_finished.clear()
            finished = [t for t in threads if t.finished.is_set()]
            if interrupts.interrupted:
                ended_by, reason = BY_INTERRUPT, SIGINT.CAUSE
            elif len(finished) == len(threads):
                ended_by = BY_VCPU
            elif finished and (first_stops_all or any(t.error for t in finished)):
                ended_by = BY_VCPU   # a vCPU that failed stops the others too
            elif time.monotonic() >= deadline:
                ended_by, reason = BY_TIMEOUT, f"timeout after {timeout} s"
        _stop_all(threads, SIGINT.CAUSE if ended_by is BY_INTERRUPT
                  else None if reason is None else f"machine stopped: {reason}")
    for thread in threads:
        if thread.error is not None:
            raise thread.error
    results = [t.result for t in threads]
    if reason is None:
        first = min(threads, key=lambda t: t.finished_at)
        reason = f"vCPU {first.runner.vcpu.id} stopped: {first.result.stop_reason}"
    return VcpusRun(results, ended_by, reason)


def _stop_all(threads: list[_VcpuThread], cause: str | None) -> None:
    """Stop every vCPU whose run goes on (with `cause`, else "machine stopped: ..." naming
    the first that stopped) until its thread has left run(). A runner told already
    (isa-debug-exit, Ctrl-C, stop(): armed, it was told even before its thread began)
    keeps that cause."""
    deadline = time.monotonic() + STOP_GRACE
    while True:
        alive = [t for t in threads if not t.finished.is_set()]
        if not alive:
            return
        if time.monotonic() > deadline:
            names = ", ".join(t.name for t in alive)
            raise VcpuStuckError(f"{names} did not leave KVM_RUN within {STOP_GRACE} s of "
                                 "being kicked")
        if cause is None:
            first = min(threads, key=lambda t: t.finished_at)
            why = first.result.stop_reason if first.result else repr(first.error)
            cause = f"machine stopped: vCPU {first.runner.vcpu.id} stopped: {why}"
        for thread in alive:
            if not thread.runner.stop_requested.is_set():
                thread.runner.stop(cause)
        alive[0].finished.wait(0.01)
