"""The Unicorn hooks of the tcg vCPU: called in the middle of an instruction, each turns
what happened into the exit KVM_RUN would return (recorded, then `uc_emu_stop`), or, for
port I/O with a handler, calls the device right there as QEMU's TCG does."""
from __future__ import annotations

import ctypes

from unicorn import x86_const as x86

from ...kvm.exits import Debug, Exit, IoIn, IoOut, MmioRead, MmioWrite
from .restart import Access
from .stats import INDEX

DR6_FIXED = 0xFFFF0FF0
_EXITS, _IO_EXITS = INDEX["exits"], INDEX["io_exits"]
INLINE_COUNTED = (_EXITS, _IO_EXITS)   # the counters a port access handled inline bumps


class UnicornHooks:
    """Part of `TcgVcpu`: the callbacks it gives its engine."""

    def _on_out(self, exit: IoOut, rip: int, cs: int) -> None:
        if self._io_handler is not None and not self._single_step:
            self._dispatch_inline(exit, rip, cs)
            return
        self._exit = exit
        self._engine.stop()

    def _on_in(self, exit: IoIn, rip: int, cs: int) -> int:
        logged = self._log.replay("in", exit.port, exit.size)
        if logged is not None:
            return logged.value or 0
        if self._io_handler is not None and not self._single_step:
            value = self._dispatch_inline(exit, rip, cs)
            if self._log.replaying:  # INS run again: its store may exit again
                self._log.record_answered(Access("in", exit.port, exit.size, value))
            return value
        self._exit = exit
        self._in_rip = rip
        self._engine.stop()
        return 0

    def _dispatch_inline(self, exit: IoIn | IoOut, rip: int, cs: int) -> int:
        """QEMU's cpu_outb/cpu_inb: the device is called from the instruction; an IN's
        answer (set by `complete_io_in` in the handler) is what the instruction reads.
        The exit counts before the handler sees it, as those `run()` returns do; `synced_rip`
        gives RIP where KVM reports it (`_out_rip`)."""
        counts = self._counts
        counts[_EXITS] += 1
        counts[_IO_EXITS] += 1
        if exit.__class__ is IoOut:
            rip = self._past_out.get((rip, cs)) or self._out_rip(rip, cs)
        self._inline, self._inline_rip, self._inline_reply = exit, rip, 0
        try:
            stop = self._io_handler(exit)
        finally:
            self._inline = None
        if stop:  # run() returns it once the instruction (this element of it) completes
            self._exit = self._handled = exit
            self._engine.stop()
        return self._inline_reply

    def _on_cpuid(self):
        engine = self._engine
        answer = self._cpuid.lookup(engine.read(x86.UC_X86_REG_RAX) & 0xFFFFFFFF,
                                    engine.read(x86.UC_X86_REG_RCX) & 0xFFFFFFFF)
        for reg, value in zip((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX,
                               x86.UC_X86_REG_RDX), answer):
            engine.write(reg, value)
        return 1  # the hook gave the answer; Unicorn skips its own

    def _on_interrupt(self, uc, vector, _):
        self._vector = vector
        self._engine.stop()

    def _on_breakpoint(self, uc, address, size, index):
        if self._log.replaying:
            return
        if address == self._resume_at:  # RF: resuming at the breakpoint does not hit it
            self._resume_at = None
            return
        self._exit = Debug(1, address, DR6_FIXED | 1 << index, self._debug_dr7)
        self._resume_at = address
        self._engine.stop()

    def _on_mmio_read(self, address: int, size: int) -> int:
        if self._exit is not None:  # after the exit: the rest of a split access, or INS's store
            return 0
        logged = self._log.replay("read", address, size)
        if logged is not None:
            return logged.value or 0
        self._memory_exit(Access("read", address, size, None), MmioRead(address, size))
        return 0

    def _on_mmio_write(self, address: int, size: int, value: int) -> None:
        if self._exit is not None:  # after the exit: the rest of a split access, or INS's store
            return
        if self._log.replay("write", address, size) is None:
            self._memory_exit(Access("write", address, size, value),
                              MmioWrite(address, size, value.to_bytes(size, "little")))

    def _on_rom_write(self, uc, access, address, size, value, _) -> bool:
        """A store to ROM; Unicorn reports it with its guest-physical address."""
        if self._exit is not None:  # after the exit: the rest of a split access, or INS's store
            return False
        logged = self._log.replay("rom", address, size)
        if logged is not None:  # let the replayed store through; AccessLog undoes it
            host = self.vm.host_address(address)
            logged.saved = (host, ctypes.string_at(host, size))
            return True
        self._memory_exit(Access("rom", address, size, value),
                          MmioWrite(address, size, value.to_bytes(size, "little")))
        return False

    def _memory_exit(self, access: Access, exit: Exit) -> None:
        self._log.record(access)
        self._exit = exit
        self._engine.stop()  # Unicorn abandons the instruction: it runs again later
