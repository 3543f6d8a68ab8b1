"""The run loop: QEMU's `kvm_cpu_exec`, stepped, broken and stopped from a notebook.

`VcpuRunner` wraps one vCPU of any accelerator: `run()` until a stop condition, `step()` one
instruction, hardware breakpoints, and `stop()` from another thread or the notebook's stop
button. Every exit is recorded (`ExitLog`), with KVM's own counters since the previous exit,
so a learner sees how much the kernel handled between two exits that reached userspace.
On tcg, `run()` handles port I/O inside emulation as QEMU's TCG does (`dispatch_port_io`):
the same dispatch, records and stop conditions, without leaving Unicorn for each access.
"""
from __future__ import annotations

import gc
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..devices.bus import Bus, BusError
from ..kvm.abi import KVM_SYNC_X86_REGS, ExitReason
from ..kvm.exits import (Debug, Exit, ExitDecodeError, Hlt, Interrupted, IoIn, IoOut, MmioRead,
                         MmioWrite)
from .exitlog import ExitLog, ExitRecord
from .dispatch import RESUME, STOP, Outcome, handle_exit
from .explain import explain
from .snapshot import RegisterSnapshot
from ..x86 import HW_BREAKPOINTS

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
_clock = time.perf_counter
_TRANSFERS = (IoIn, IoOut, MmioRead, MmioWrite)  # completed by the KVM_RUN after their exit


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
        self.stop_requested = threading.Event()
        self._stop_cause = "stopped"
        vcpu.enable_sync_regs(KVM_SYNC_X86_REGS)  # RIP per exit without a GET_REGS ioctl
        self.halted = False
        self._thread: int | None = None
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
        return exit, self._handle(exit, _clock() - start)

    def _on_port_io(self, exit: IoIn | IoOut) -> bool:
        """Port I/O inside tcg's emulation: handled and recorded as an exit, and checked
        against the run's stop conditions; True stops the guest after this access."""
        outcome = self._handle(exit, _clock() - self._resumed)
        stop_reason = self._check_exit(exit, outcome)
        self._resumed = _clock()
        if stop_reason is None:
            return False
        self._inline_exit, self._inline_outcome, self._inline_stop = exit, outcome, stop_reason
        return True

    def _handle(self, exit: Exit, duration: float) -> Outcome:
        """Dispatch one exit to its device, complete it, record it."""
        vcpu = self.vcpu
        try:
            outcome = handle_exit(exit, self.pio, self.mmio)
        except BusError as e:
            outcome = Outcome(STOP, stop_reason=f"bad access from the guest ({exit.describe()}): {e}")
        if outcome.answer is not None:
            outcome.answer(vcpu, exit, outcome.reply)
        counters = self._counters() if self._counters is not None else None
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
        `predicate(record)`, `max_exits`, `timeout` seconds, or `stop()` / Ctrl-C."""
        self.stop_requested.clear()
        self._thread = threading.get_ident()
        self._stop_cause = "stopped"
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
        with _stop_on_sigint(self):
            if timer:
                timer.start()
            if dispatch_port_io is not None:
                dispatch_port_io(self._on_port_io)
            try:
                if self.breakpoints and self.vcpu.get_regs().rip in self.breakpoints:
                    # Resuming at a breakpoint would hit it again at once: step over it
                    # first, as QEMU's gdbstub does.
                    stepped = self.step()
                    exit, self._exits = stepped.exit, 1
                    if exit.__class__ is not Debug and stepped.outcome.action is STOP:
                        stop_reason = self._stop_reason(exit, stepped.outcome)
                enter, stopping = self._enter, self.stop_requested.is_set
                while stop_reason is None:
                    if stopping():
                        stop_reason = self._stop_cause
                        break
                    exit, outcome = enter()
                    if exit.__class__ is Interrupted:
                        continue  # a kick, not an exit the guest caused
                    if exit is self._inline_exit:
                        stop_reason = self._inline_stop
                    else:
                        stop_reason = self._check_exit(exit, outcome)
            except ExitDecodeError as e:
                stop_reason = f"KVM reported an exit that cannot be decoded: {e}"
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
        The exit being handled is finished first, so nothing is lost and `run()` resumes."""
        self._stop_cause = cause
        self.stop_requested.set()
        self.vcpu.kick(self._thread)

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

    def step(self) -> StepResult:
        """Execute one instruction (KVM_SET_GUEST_DEBUG single-step) and say what changed.

        A HLT is run without single-step, which exits as HLT on every backend, as in `run()`:
        single-stepped, it exits as HLT on VMX and SVM but kvm_pvm steps over it like a NOP
        (`Backend.single_step_reports_hlt`) and the guest runs into what follows. Code is
        read at CS.base + RIP, which assumes identity-mapped paging."""
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
