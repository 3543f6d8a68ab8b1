"""Memory exits by restarting the instruction, as KVM's emulator does.

A load from MMIO must return its value inside Unicorn's callback, before userspace has
answered. KVM has the same problem and solves it by exiting to userspace and, on the next
KVM_RUN, executing the instruction again with the answer at hand (`complete_emulated_mmio`,
`vcpu->mmio_fragments`). tcg does the same: Unicorn abandons an instruction whose memory
callback stopped emulation (registers and RIP as before it, as for a page fault), so the
first access the instruction makes to MMIO or ROM becomes the exit, and the vCPU then runs
that instruction alone again, this log replaying the accesses already reported: a read
gets the answer `complete_mmio_read` gave, a write that was already reported is not
reported twice, a write to ROM is let through and undone at once (KVM_MEM_READONLY drops
it). INS is restarted the same way: stopping at its port read abandons its store, so it
reads `complete_io_in`'s answer when it runs again; a port read answered inside emulation
while INS runs again is logged as well, so that a store exiting after it does not make the
device answer twice. An instruction making a further access exits again; one that completes
clears the log.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass


@dataclass
class Access:
    kind: str              # "read", "write" (MMIO), "rom" (a store to ROM), "in" (INS)
    address: int           # guest-physical, or the port for "in"
    size: int
    value: int | None      # the value written, or the read's answer (None: not yet given)
    saved: tuple[int, bytes] | None = None  # ROM bytes a replayed store overwrote: (host, old)


class AccessLog:
    """The accesses the instruction being restarted has made so far, in order."""

    def __init__(self) -> None:
        self.accesses: list[Access] = []
        self.replaying = False
        self._position = 0

    @property
    def pending(self) -> bool:
        """An instruction was abandoned at a memory exit and must run again."""
        return bool(self.accesses)

    @property
    def replayed_all(self) -> bool:
        """Every logged access was made again: the instruction got past all of them."""
        return self._position >= len(self.accesses)

    def begin_replay(self) -> None:
        self.replaying, self._position = True, 0

    def replay(self, kind: str, address: int, size: int) -> Access | None:
        """The logged access this one repeats, or None if it is new (and must exit)."""
        if not self.replaying or self._position >= len(self.accesses):
            return None
        logged = self.accesses[self._position]
        if (logged.kind, logged.address, logged.size) != (kind, address, size):
            del self.accesses[self._position:]  # the instruction took another path
            return None
        self._position += 1
        return logged

    def waiting(self, kind: str, address: int) -> Access | None:
        """The access the last exit reported, if it is of this kind and still unanswered."""
        last = self.accesses[-1] if self.accesses else None
        if last is None or (last.kind, last.address, last.value) != (kind, address, None):
            return None
        return last

    def record(self, access: Access) -> None:
        self.accesses.append(access)

    def record_answered(self, access: Access) -> None:
        """Log an access made while replaying that got its answer at once (a port read
        handled inside emulation): if the instruction exits again, it is replayed too."""
        self.accesses.append(access)
        self._position = len(self.accesses)

    def end_replay(self, completed: bool) -> None:
        """Undo replayed ROM stores; forget the log once the instruction has completed."""
        self.replaying = False
        for access in self.accesses:
            if access.saved is not None:
                host, old = access.saved
                ctypes.memmove(host, old, len(old))
                access.saved = None
        if completed:
            self.accesses.clear()

    def clear(self) -> None:
        """The instruction was abandoned for good (its registers were replaced)."""
        self.end_replay(completed=True)
