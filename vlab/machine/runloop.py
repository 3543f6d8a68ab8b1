"""The run loop: QEMU's `kvm_cpu_exec`, stepped, broken and stopped from a notebook.

`handle_exit` is the `switch (run->exit_reason)`: a pure function from a decoded exit to an
`Outcome`, dispatching port I/O and MMIO to the buses, so tests feed it made-up exits.
`VcpuRunner` wraps one vCPU of any accelerator: `run()` until a stop condition, `step()` one
instruction, hardware breakpoints, and `stop()` from another thread or the notebook's stop
button. Every exit is recorded (`ExitLog`), with KVM's own counters since the previous exit,
so a learner sees how much the kernel handled between two exits that reached userspace.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable

from ..devices.bus import Bus, BusError
from ..kvm.abi import KVM_SYNC_X86_REGS, ExitReason
from ..kvm.exits import (Debug, Exit, FailEntry, Hlt, InternalError, Interrupted, IoIn, IoOut,
                         MmioRead, MmioWrite, Shutdown, SystemEvent, X86Rdmsr, X86Wrmsr)
from .exitlog import ExitLog, ExitRecord
from .snapshot import RegisterSnapshot

# KVM's vCPU counters worth showing next to each userspace exit (names from the stats fd).
KERNEL_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits",
                   "insn_emulation", "insn_emulation_fail", "signal_exits", "request_irq_exits",
                   "halt_wakeup", "irq_injections", "nmi_injections", "pf_taken", "hypercalls")

RESUME, STOP = "resume", "stop"


@dataclass(slots=True)
class Outcome:
    """What the loop does with one exit."""
    action: str                      # RESUME or STOP
    device: str | None = None        # the device that handled it, if any
    reply: bytes | None = None       # bytes answering an IN or MMIO read
    stop_reason: str | None = None   # why the guest stopped, in words
    claimed: bool = True             # False: nobody owns that port/address


_HLT = Outcome(STOP, stop_reason="HLT: the guest halted")


def handle_exit(exit: Exit, pio: Bus, mmio: Bus) -> Outcome:
    """Route one exit to the device that owns the port or address (QEMU: kvm_handle_io,
    address_space_rw) and say whether the guest may go on."""
    cls = exit.__class__
    if cls is IoOut:
        device = pio.pio_out(exit.port, exit.size, exit.count, exit.data)
        return Outcome(RESUME, device.name, None) if device else Outcome(RESUME, claimed=False)
    if cls is IoIn:
        data, device = pio.pio_in(exit.port, exit.size, exit.count)
        return Outcome(RESUME, device.name if device else None, data, claimed=device is not None)
    if cls is MmioWrite:
        device = mmio.dispatch_write(exit.address, exit.value, _mmio_size(exit.length))
        return Outcome(RESUME, device.name if device else None, claimed=device is not None)
    if cls is MmioRead:
        size = _mmio_size(exit.length)
        value, device = mmio.dispatch_read(exit.address, size)
        return Outcome(RESUME, device.name if device else None,
                       value.to_bytes(size, "little")[:exit.length], claimed=device is not None)
    if cls is Hlt:
        return _HLT
    if cls is Interrupted:
        return Outcome(RESUME, stop_reason="interrupted")
    if cls is Debug:
        return Outcome(STOP, stop_reason="debug exception")
    if cls is Shutdown:
        return Outcome(STOP, stop_reason="SHUTDOWN: triple fault, the vCPU cannot continue")
    if cls is FailEntry:
        return Outcome(STOP, stop_reason=f"FAIL_ENTRY: VM entry failed "
                                         f"(hardware reason {exit.hardware_entry_failure_reason:#x})")
    if cls is InternalError:
        return Outcome(STOP, stop_reason=f"INTERNAL_ERROR {exit.suberror_name}: KVM could not go on")
    if cls is SystemEvent:
        return Outcome(STOP, stop_reason=f"SYSTEM_EVENT {exit.type_name}")
    if cls is X86Rdmsr:
        return Outcome(RESUME, reply=(0).to_bytes(8, "little"), claimed=False)
    if cls is X86Wrmsr:
        return Outcome(RESUME, claimed=False)
    return Outcome(STOP, stop_reason=f"unhandled exit {exit.reason.name}")


def _mmio_size(length: int) -> int:
    """Devices take 1, 2, 4 or 8-byte accesses; an odd-length MMIO access is widened."""
    return length if length in (1, 2, 4, 8) else (4 if length < 4 else 8)


@dataclass
class RunResult:
    """How a `run()` ended."""
    stop_reason: str
    exits: int                        # userspace exits during this run
    seconds: float
    last_exit: Exit | None
    rip: int

    def __str__(self) -> str:
        return (f"stopped: {self.stop_reason} after {self.exits} exits in {self.seconds:.3f} s, "
                f"RIP={self.rip:#x}")


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


class VcpuRunner:
    """Runs one vCPU against the machine's buses and records every exit."""

    def __init__(self, vcpu, pio: Bus, mmio: Bus, *, read_code: Callable[[int, int], bytes] | None = None,
                 log: ExitLog | None = None, kernel_counters: bool = True,
                 backend_steps_over_hlt: bool = False):
        self.vcpu = vcpu
        self.pio, self.mmio = pio, mmio
        self.log = log if log is not None else ExitLog()
        self.read_code = read_code
        self.breakpoints: tuple[int, ...] = ()
        self.backend_steps_over_hlt = backend_steps_over_hlt
        self.stop_requested = threading.Event()
        self._stop_cause = "stopped"
        vcpu.enable_sync_regs(KVM_SYNC_X86_REGS)  # RIP per exit without a GET_REGS ioctl
        self.halted = False
        self._thread: int | None = None
        self._stats = None
        self._counters = None
        if kernel_counters:
            try:
                self._stats = vcpu.get_stats_fd()
            except (OSError, NotImplementedError, AttributeError):
                self._stats = None
        if self._stats is not None:
            names = self._stats.names()
            present = [n for n in KERNEL_COUNTERS if n in names]
            index = {d.name: d.offset // 8 for d in self._stats.descriptors}
            self.counter_names = tuple(present)
            self._counters = itemgetter(*(index[n] for n in present)) if len(present) > 1 else None
        else:
            self.counter_names = ()
        if not self.log.counter_names:
            self.log.counter_names = self.counter_names
        self._previous_counters = self._read_counters()

    # -- kernel counters --------------------------------------------------------------------
    def _read_counters(self) -> tuple[int, ...] | None:
        if self._counters is None:
            return None
        return self._counters(self._stats.read_raw())

    def kernel_counters(self) -> dict[str, int]:
        """KVM's counters for this vCPU now (all of them, by name)."""
        return self._stats.read() if self._stats is not None else {}

    # -- one exit ---------------------------------------------------------------------------
    def _enter(self) -> tuple[Exit, Outcome]:
        """KVM_RUN once, handle the exit, record it: the body of kvm_cpu_exec's loop."""
        vcpu = self.vcpu
        start = time.perf_counter()
        exit = vcpu.run()
        duration = time.perf_counter() - start
        try:
            outcome = handle_exit(exit, self.pio, self.mmio)
        except BusError as e:
            outcome = Outcome(STOP, stop_reason=f"bad access from the guest: {e}")
        if outcome.reply is not None:
            cls = exit.__class__
            if cls is IoIn:
                vcpu.complete_io_in(exit, outcome.reply)
            elif cls is MmioRead:
                vcpu.complete_mmio_read(exit, outcome.reply)
            elif cls is X86Rdmsr:
                vcpu.complete_rdmsr(exit, int.from_bytes(outcome.reply, "little"), error=True)
        counters = self._counters(self._stats.read_raw()) if self._counters is not None else None
        self.log.append(ExitRecord(vcpu.id, exit, vcpu.synced_rip, outcome.device,
                                   outcome.claimed, duration, self._previous_counters, counters))
        self._previous_counters = counters
        return exit, outcome

    # -- running ------------------------------------------------------------------------------
    def run(self, *, until: ExitReason | type | None = None,
            predicate: Callable[[ExitRecord], bool] | None = None,
            max_exits: int | None = None, timeout: float | None = None) -> RunResult:
        """Run until HLT, a fatal exit, a breakpoint, `until` (an ExitReason or exit class),
        `predicate(record)`, `max_exits`, `timeout` seconds, or `stop()` / Ctrl-C."""
        self.stop_requested.clear()
        self._thread = threading.get_ident()
        self._stop_cause = "stopped"
        timer = (threading.Timer(timeout, self.stop, (f"timeout after {timeout} s",))
                 if timeout is not None else None)
        exits = 0
        exit: Exit | None = None
        stop_reason = None
        started = time.perf_counter()
        with _stop_on_sigint(self):
            if timer:
                timer.start()
            try:
                if self.breakpoints and self.read_code is not None:
                    self._step_off_breakpoint()
                while stop_reason is None:
                    if self.stop_requested.is_set():
                        stop_reason = self._stop_cause
                        break
                    exit, outcome = self._enter()
                    exits += 1
                    if outcome.action is STOP:
                        stop_reason = self._stop_reason(exit, outcome)
                    elif exit.__class__ is Interrupted:
                        exits -= 1  # not a userspace exit the guest caused
                        continue
                    elif until is not None and (exit.reason == until if isinstance(until, int)
                                                else isinstance(exit, until)):
                        stop_reason = f"reached {exit.describe()}"
                    elif predicate is not None and predicate(self.log.last):
                        stop_reason = "predicate matched"
                    elif max_exits is not None and exits >= max_exits:
                        stop_reason = f"max_exits={max_exits} reached"
            finally:
                if timer:
                    timer.cancel()
                self._thread = None
        return RunResult(stop_reason, exits, time.perf_counter() - started, exit,
                         self.vcpu.get_regs().rip)

    def _stop_reason(self, exit: Exit, outcome: Outcome) -> str:
        if exit.__class__ is Debug:
            hit = [i for i in range(4) if exit.dr6 & (1 << i)]
            if hit and hit[0] < len(self.breakpoints):
                return f"breakpoint {hit[0]} at {self.breakpoints[hit[0]]:#x}"
            return f"debug exception {exit.exception} at {exit.pc:#x}"
        if exit.__class__ is Hlt:
            self.halted = True
        return outcome.stop_reason

    def stop(self, cause: str = "stopped") -> None:
        """Stop a `run()` in progress, from any thread (the notebook's stop button, a timer).
        The exit being handled is finished first, so nothing is lost and `run()` resumes."""
        self._stop_cause = cause
        self.stop_requested.set()
        self.vcpu.kick(self._thread)

    # -- stepping -----------------------------------------------------------------------------
    def set_breakpoints(self, addresses) -> None:
        """Up to four hardware execution breakpoints (DR0-DR3), by linear address."""
        addresses = tuple(addresses)
        self.vcpu.set_guest_debug(enable=bool(addresses), hw_breakpoints=addresses)
        self.breakpoints = addresses

    def _next_opcode(self, regs, sregs) -> int | None:
        if self.read_code is None:
            return None
        try:
            return self.read_code(sregs.cs.base + regs.rip, 1)[0]
        except (ValueError, IndexError):
            return None

    def step(self) -> StepResult:
        """Execute one instruction (KVM_SET_GUEST_DEBUG single-step) and say what changed.

        Some backends (kvm_pvm) step over HLT without a HLT exit; there the instruction is
        looked at first and a HLT is run without single-step, so it exits as HLT."""
        before = RegisterSnapshot.capture(self.vcpu)
        steps_over_hlt = (self.backend_steps_over_hlt
                          and self._next_opcode(before.regs, before.sregs) == _HLT_OPCODE)
        self.vcpu.set_guest_debug(enable=True, single_step=not steps_over_hlt,
                                  hw_breakpoints=self.breakpoints)
        try:
            while True:
                exit, outcome = self._enter()
                if exit.__class__ is not Interrupted:
                    break
            if exit.__class__ in (IoIn, IoOut, MmioRead, MmioWrite) and not steps_over_hlt:
                # The instruction completes on the next entry, which then reports the step.
                exit2, outcome2 = self._enter()
                if exit2.__class__ is not Debug:
                    exit, outcome = exit2, outcome2
        finally:
            self.vcpu.set_guest_debug(enable=bool(self.breakpoints), hw_breakpoints=self.breakpoints)
        if exit.__class__ is Hlt:
            self.halted = True
        after = RegisterSnapshot.capture(self.vcpu)
        return StepResult(before, after, exit, outcome, before.diff(after))

    def _step_off_breakpoint(self) -> None:
        """Resuming at a breakpoint would hit it again at once: step over it first, as
        QEMU's gdbstub does."""
        rip = self.vcpu.get_regs().rip
        if rip in self.breakpoints:
            self.vcpu.set_guest_debug(enable=True, single_step=True)
            try:
                exit, _ = self._enter()
                if exit.__class__ in (IoIn, IoOut, MmioRead, MmioWrite):
                    self._enter()
            finally:
                self.vcpu.set_guest_debug(enable=True, hw_breakpoints=self.breakpoints)

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None
            self._counters = None


class _stop_on_sigint:
    """While a run is in progress in the main thread, Ctrl-C (the notebook's stop button)
    stops the guest cleanly instead of raising KeyboardInterrupt mid-exit."""

    def __init__(self, runner: VcpuRunner):
        self.runner = runner
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.runner._stop_cause = "interrupted by Ctrl-C"
        self.runner.stop_requested.set()
        self.runner.vcpu.kick(None)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
