"""The tcg vCPU: `vlab.kvm.VcpuFd`'s surface over one Unicorn engine (QEMU's TCG CPU).

`run()` returns what KVM_RUN would: one exit per call, from the same `vlab.kvm.exits` types.
Unicorn reports events through hooks that fire in the middle of an instruction; each hook
records the exit and calls `uc_emu_stop`, and `run()` returns the exit once `uc_emu_start`
has come back. A stop takes effect at the next instruction boundary only because the
engine always runs with an instruction count (`count=`): Unicorn then checks for a stop
before every instruction, where without one it would finish the whole translated block.

- OUT: the instruction completes, then `IoOut`. IN: Unicorn wants the value from the hook,
  so IN completes with 0 and `complete_io_in` puts the answer in AL/AX/EAX; INS, whose
  store the stop abandons, restarts like a memory exit (see `restart`). String I/O exits
  once per element (`count` is always 1): TCG runs `rep` one element per iteration.
- MMIO and stores to ROM restart the instruction (see `restart`): `MmioRead` leaves RIP at
  the load until `complete_mmio_read` answers it, as on KVM; a store is completed before
  `MmioWrite` is returned, as KVM does.
- HLT: `Hlt` with RIP after the HLT. CPUID answers from the `set_cpuid2` table. Exceptions
  are handled by `exceptions`, #UD too: Unicorn stops on an undefined opcode (or one QEMU's
  TCG lacks, for which QEMU raises #UD as well) with UC_ERR_INSN_INVALID instead of calling
  the interrupt hook. Any other stop is an `InternalError` (KVM_INTERNAL_ERROR_EMULATION)
  with the bytes at RIP.
- `set_guest_debug`: single-step runs one instruction per `run()` (`count=1`) and returns
  `Debug` with DR6.BS; hardware breakpoints are Unicorn code hooks on their addresses,
  returning `Debug` with DR6.Bn before the instruction runs, and not again when resuming
  there (x86's RF flag). An exit from a stepped instruction comes first, its `Debug` next.
- `dispatch_port_io(handler)` handles port I/O inside emulation instead, as QEMU's TCG
  does: the hook calls `handler(exit)` and the guest runs on, so `run()` returns only for
  other exits or when the handler asks to stop (see its docstring). Given the run loop's
  compiled handling too, the C hooks offer each access to it first, without Python.
- `kick()` stops a running vCPU from any thread (`uc_emu_stop` needs no signal);
  `immediate_exit` behaves as kvm_run's; `time_limit` makes `run()` return `Interrupted`
  after that long without an exit; the watchdog's time slices let Python handle signals.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from unicorn import (UC_ERR_INSN_INVALID, UC_ERR_OK, UC_HOOK_CODE, UC_HOOK_INTR,
                     UC_HOOK_MEM_WRITE_PROT)
from unicorn import x86_const as x86

from ...kvm.abi import InternalErrorSuberror
from ...kvm.exits import (Debug, Exit, Hlt, InternalError, Interrupted, IoIn, IoOut,
                          MmioRead, MmioWrite, Shutdown, X86Rdmsr)
from ...kvm.state import Regs, Segment, Sregs
from ...x86 import HW_BREAKPOINTS, opcode_offset
from .cpuid import CpuidAnswers
from .cpustate import read_segments
from .engine import Engine
from .exceptions import UD_VECTOR, deliver
from .hooks import DR6_FIXED, INLINE_COUNTED, UnicornHooks
from .portio import IoShape, io_shape
from .restart import Access, AccessLog
from .stats import INDEX, NAMES, TcgStats
from .vcpu_state import TcgVcpuState
from .watchdog import WATCHDOG

RUN_FOREVER = 1 << 62        # an instruction count never reached (see the module docstring)
DR6_BS, DR7_FIXED = 1 << 14, 0x400
_HLT = 0xF4

# The architectural reset state, as a fresh KVM vCPU reports it.
RESET_SREGS = Sregs(cs=Segment(selector=0xF000, base=0xFFFF0000, type=11))
RESET_REGS = Regs(rip=0xFFF0, rdx=0x600)

_STAT = {IoIn: "io_exits", IoOut: "io_exits", MmioRead: "mmio_exits", MmioWrite: "mmio_exits",
         Hlt: "halt_exits", Interrupted: "signal_exits", Debug: "debug_exits",
         Shutdown: "shutdown_exits", InternalError: "insn_emulation_fail"}
_STAT_INDEX = {kind: INDEX[name] for kind, name in _STAT.items()}
_EXITS, _EMU_STARTS = INDEX["exits"], INDEX["emu_starts"]
_INJECTIONS = INDEX["exception_injections"]
_RAN = (IoIn, IoOut, MmioWrite, Hlt)  # exits after which a stepped instruction has completed


class _Outcome:
    """How an `emu_start` ended when no exit was recorded."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


STOPPED = _Outcome("STOPPED")      # instruction count reached, HLT, kick or time slice
DELIVERED = _Outcome("DELIVERED")  # an exception went to the guest's own handler


class _ClosedEngine:
    """Stands in for the engine of a closed vCPU."""

    def __init__(self, vcpu_id: int):
        self._vcpu_id = vcpu_id

    def __getattr__(self, name):
        raise ValueError(f"vCPU {self._vcpu_id} is closed")


class TcgVcpu(UnicornHooks, TcgVcpuState):
    """One software vCPU (QEMU's CPUState under TCG), with its own Unicorn engine."""

    def __init__(self, vm, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self.immediate_exit = False
        self.time_limit: float | None = None   # seconds without an exit before Interrupted
        self._engine = Engine(self._on_mmio_read, self._on_mmio_write)
        self._counts = [0] * len(NAMES)
        self._exit: Exit | None = None
        self._vector: int | None = None
        self._pending: list[Exit] = []
        self._log = AccessLog()
        self._in_rip = 0
        self._cpuid = CpuidAnswers()
        self._single_step = False
        self._breakpoint_hooks: list[int] = []
        self._debug_dr7 = DR7_FIXED
        self._resume_at: int | None = None
        self._slice_lock = threading.Lock()
        self._running = False
        self._slice_expired = False
        self._ticked_entries = -1
        self._shadow = RESET_SREGS
        self._io_handler: Callable[[IoIn | IoOut], bool] | None = None
        self._inline: IoIn | IoOut | None = None   # the port I/O the handler is handling now
        self._inline_rip = 0                       # ... and RIP where KVM reports it
        self._inline_reply = 0
        self._handled: Exit | None = None          # the last exit a handler stopped on
        self._past_out: dict[tuple[int, int], int] = {}       # (RIP, CS) of an OUT -> RIP past it
        self._io_shapes: dict[tuple[int, int], IoShape] = {}  # ... of a `rep outs`
        uc = self._engine.uc
        self._engine.hook_insn(x86.UC_X86_INS_OUT, self._on_out)
        self._engine.hook_insn(x86.UC_X86_INS_IN, self._on_in)
        self._engine.hook_insn(x86.UC_X86_INS_CPUID, self._on_cpuid)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_rom_write)
        self.set_sregs(RESET_SREGS)
        self.set_regs(RESET_REGS)
        WATCHDOG.watch(self)

    def _tick(self) -> None:
        """Called by the watchdog: end a slice that has lasted a whole period."""
        with self._slice_lock:
            entries = self._counts[_EMU_STARTS]
            if self._running and entries == self._ticked_entries:
                self._slice_expired = True
                self._engine.stop()
            self._ticked_entries = entries

    # --- KVM_RUN ------------------------------------------------------------------------------
    def run(self) -> Exit:
        """Run until the guest needs the VMM; one exit per call, as KVM_RUN."""
        exit = self._next_exit()
        if exit is not self._handled:   # else counted where a port-I/O handler took it
            counts = self._counts
            counts[_EXITS] += 1
            counts[_STAT_INDEX[type(exit)]] += 1
        return exit

    def _next_exit(self) -> Exit:
        # KVM completes the last exit's MMIO or string I/O before it looks at immediate_exit
        # (complete_userspace_io); tcg too, by running the abandoned instruction again.
        if self._log.pending and not self._pending:
            exit = self._restart()
            if exit is not None:
                return self._finish(exit)
            if self._log.pending:  # kicked before the instruction ran
                self.immediate_exit = False
                return Interrupted()
            if self._single_step and not self.immediate_exit:
                return self._stepped()
        if self.immediate_exit:
            self.immediate_exit = False
            return Interrupted()
        if self._pending:
            return self._pending.pop(0)
        if self._resume_at is not None and self._linear_rip() != self._resume_at:
            self._resume_at = None
        if self._single_step:
            return self._step()
        return self._run()

    def _enter(self, count: int):
        """One `uc_emu_start` from RIP: the exit a hook recorded, or an `_Outcome`."""
        engine = self._engine
        self._exit = self._vector = None
        self._counts[_EMU_STARTS] += 1
        with self._slice_lock:  # so that a slice the watchdog ends is this one
            self._running, self._slice_expired = True, False
        try:
            status = engine.start(count)
        finally:
            with self._slice_lock:
                self._running = False
        exit = self._exit
        if exit is not None:
            if type(exit) is IoIn and exit is not self._handled and engine.rip() == self._in_rip:
                # INS stores what it read: the stop abandoned it, like a memory exit
                self._log.record(Access("in", exit.port, exit.size, None))
            return exit
        if status == UC_ERR_INSN_INVALID:  # QEMU's EXCP06_ILLOP, RIP at the instruction
            self._vector = UD_VECTOR
        if self._vector is not None:
            exit = deliver(engine, self._vector, self._shadow)
            if exit is not None:
                return exit
            self._counts[_INJECTIONS] += 1
            return DELIVERED
        if status != UC_ERR_OK:
            return InternalError(InternalErrorSuberror.EMULATION,
                                 insn_bytes=engine.fetch(self._linear_rip()))
        return STOPPED

    def _run(self) -> Exit:
        started = time.monotonic()
        while True:
            outcome = self._enter(RUN_FOREVER)
            if outcome is DELIVERED:
                continue
            if outcome is not STOPPED:
                return self._finish(outcome)
            if self.immediate_exit:  # kicked
                self.immediate_exit = False
                return Interrupted()
            if not self._slice_expired:
                return Hlt()
            self._slice_expired = False
            if self.time_limit is not None and time.monotonic() - started >= self.time_limit:
                return Interrupted()

    def _finish(self, exit: Exit) -> Exit:
        """KVM completes a store to MMIO before its exit reaches userspace: so does tcg, by
        running the restarted instruction at once (a further exit it makes comes next)."""
        if type(exit) is MmioWrite:
            follow = self._restart()
            if follow is not None:
                self._pending.append(follow)
        return exit

    def _restart(self) -> Exit | None:
        """Run the instruction a memory exit abandoned, alone; None once it has completed."""
        log = self._log
        log.begin_replay()
        outcome = self._enter(1)
        completed = log.replayed_all and not isinstance(outcome, (MmioRead, MmioWrite))
        log.end_replay(completed)
        return outcome if isinstance(outcome, Exit) else None

    def _step(self) -> Exit:
        halts = self._opcode() == _HLT
        outcome = self._enter(1)
        if isinstance(outcome, Exit):
            exit = self._finish(outcome)
            if isinstance(exit, _RAN) and not self._log.pending:
                self._pending.append(self._stepped())
            return exit
        if self.immediate_exit:
            self.immediate_exit = False
            return Interrupted()
        if halts and outcome is STOPPED:
            self._pending.append(self._stepped())
            return Hlt()
        return self._stepped()

    def _stepped(self) -> Debug:
        return Debug(1, self._linear_rip(), DR6_FIXED | DR6_BS, self._debug_dr7)

    # --- decoding what is at RIP --------------------------------------------------------------
    def _linear_rip(self, cs: Segment | None = None) -> int:
        """RIP as a linear address: plus the CS base, except in 64-bit code."""
        cs = cs or read_segments(self._engine.uc)["cs"]
        rip = self._engine.rip()
        return rip if cs.l else (cs.base + rip) & 0xFFFFFFFF

    def _opcode(self) -> int | None:
        """The opcode byte of the instruction at RIP, prefixes (REX in 64-bit code) skipped."""
        cs = read_segments(self._engine.uc)["cs"]
        code = self._engine.fetch(self._linear_rip(cs))
        offset = opcode_offset(code, bool(cs.l))
        return None if offset is None else code[offset]

    # --- completing exits ---------------------------------------------------------------------
    def complete_io_in(self, exit: IoIn, data: bytes) -> None:
        """Answer an IN. A plain IN has completed with 0 in AL, AX or EAX: the answer goes
        there (EAX zero-extended, as a 32-bit IN does). INS was abandoned before storing:
        it reads the answer when it runs again on the next `run()`."""
        if len(data) != exit.size * exit.count:
            raise ValueError(f"IN from port {exit.port:#x} needs {exit.size * exit.count} "
                             f"bytes, got {len(data)}")
        value = int.from_bytes(data, "little")
        if exit is self._inline:
            self._inline_reply = value
            return
        waiting = self._log.waiting("in", exit.port)
        if waiting is not None:
            waiting.value = value
            return
        rax = self._engine.read(x86.UC_X86_REG_RAX)
        keep = {1: ~0xFF, 2: ~0xFFFF, 4: 0}[exit.size]
        self._engine.write(x86.UC_X86_REG_RAX, (rax & keep) | value)

    def complete_mmio_read(self, exit: MmioRead, data: bytes) -> None:
        """Answer an MMIO load: the restarted instruction reads `data` on the next `run()`."""
        if len(data) != exit.length:
            raise ValueError(f"MMIO read at {exit.address:#x} needs {exit.length} bytes, "
                             f"got {len(data)}")
        waiting = self._log.waiting("read", exit.address)
        if waiting is None:
            raise ValueError(f"no MMIO read at {exit.address:#x} is waiting for an answer")
        waiting.value = int.from_bytes(data, "little")

    def complete_rdmsr(self, exit: X86Rdmsr, value: int = 0, error: bool = False) -> None:
        """tcg never returns X86Rdmsr (see `msrs`), so there is nothing to complete."""
        raise ValueError("the tcg accelerator makes no RDMSR exits: the guest's RDMSR is "
                         "answered by the emulated CPU")

    # --- debugging, stats ----------------------------------------------------------------------
    def set_guest_debug(self, enable: bool = True, single_step: bool = False,
                        hw_breakpoints: tuple[int, ...] = ()) -> None:
        """Single-step and up to four execution breakpoints (linear addresses)."""
        if len(hw_breakpoints) > HW_BREAKPOINTS:
            raise ValueError(f"{len(hw_breakpoints)} hardware breakpoints; x86 has "
                             f"{HW_BREAKPOINTS} (DR0-DR3)")
        uc = self._engine.uc
        for hook in self._breakpoint_hooks:
            uc.hook_del(hook)
        breakpoints = tuple(hw_breakpoints) if enable else ()
        self._breakpoint_hooks = [uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, i, address,
                                              address)
                                  for i, address in enumerate(breakpoints)]
        self._single_step = enable and single_step
        self._debug_dr7 = DR7_FIXED | sum(1 << 2 * i for i in range(len(breakpoints)))
        # a step's Debug still queued behind its I/O exit belongs to the old settings
        self._pending = [exit for exit in self._pending if type(exit) is not Debug]
        self._engine.flush_translations()  # re-translate with (or without) the new hooks

    def enable_sync_regs(self, mask: int) -> None:
        """Nothing to enable: `synced_rip` reads Unicorn's RIP, no ioctl involved."""

    @property
    def synced_rip(self) -> int:
        """RIP at the exit (KVM_CAP_SYNC_REGS' purpose): RIP now after `run()`; in a port-I/O
        handler, where KVM reports it: at an IN, past an OUT (see `portio`)."""
        return self._engine.rip() if self._inline is None else self._inline_rip

    def _forget_io_shapes(self) -> None:
        """The host may have put new code anywhere (a loader, then set_regs or set_sregs):
        port-I/O instructions are decoded afresh."""
        self._past_out.clear()
        self._io_shapes.clear()

    def _out_rip(self, rip: int, cs: int) -> int:
        """Where KVM reports the OUT at `rip` with CS selector `cs` (Unicorn's hook sees RIP
        at it): decoded once per instruction (`portio`); past it is kept in `_past_out`,
        except for `rep outs`, whose RIP depends on the count register."""
        shape = self._io_shapes.get((rip, cs))
        engine = self._engine
        if shape is None:
            segment = read_segments(engine.uc)["cs"]
            shape = io_shape(engine.fetch(self._linear_rip(segment)), segment)
            if not shape.count_mask:
                self._past_out[(rip, cs)] = rip + shape.length
                return rip + shape.length
            self._io_shapes[(rip, cs)] = shape
        return shape.rip_after(rip, engine.read(x86.UC_X86_REG_RCX))

    def dispatch_port_io(self, handler: Callable[[IoIn | IoOut], bool] | None,
                         compiled=None) -> bool:
        """Handle port I/O inside emulation, as QEMU's TCG does: its `cpu_outb`/`cpu_inb`
        call the device on the vCPU thread, and nothing returns to the main loop.

        While `handler` is set (and single-step is off), each IN and OUT, and each element of
        INS/OUTS, calls `handler(exit)` from inside the instruction and the guest runs on.
        The handler answers an IN with `complete_io_in`, and may read `synced_rip` (where
        KVM would put RIP at this exit). Returning True stops the guest: `run()` then returns
        that exit, already handled, once its instruction (or element) has completed. The
        exits still count in `io_exits` and `exits`, not in `emu_starts`. None restores one
        exit per `run()`, as KVM_RUN.

        `compiled` (the run loop's `_runloop.InlinePortIo`, with `handler`) handles the
        accesses it can in C, called by the C hooks first; the rest reach `handler`. Returns
        whether it was taken (False without the C hooks)."""
        self._io_handler = handler
        if handler is None or compiled is None:
            self._engine.attach_port_io(None)
            return False
        compiled.bind(self._counts, INLINE_COUNTED)
        return self._engine.attach_port_io(compiled, self, self._past_out, self._log)

    def kick(self, thread_ident: int | None = None) -> None:
        """Make the `run()` in progress (or the next one) return `Interrupted`. Any thread may
        call it; Unicorn's `uc_emu_stop` needs no signal, so `thread_ident` is not used."""
        self.immediate_exit = True
        if not self.closed:
            self._engine.stop()

    def get_stats_fd(self) -> TcgStats:
        return TcgStats(self._counts, f"vcpu{self.id}")

    def close(self) -> None:
        """Free the engine now; later use of the vCPU raises instead of reaching freed C state."""
        if self.closed:
            return
        WATCHDOG.forget(self)
        self._engine.close()
        self._engine = _ClosedEngine(self.id)
        self.vm.forget_vcpu(self)

    @property
    def closed(self) -> bool:
        return isinstance(self._engine, _ClosedEngine)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<TcgVcpu id={self.id}{' closed' if self.closed else ''}>"
