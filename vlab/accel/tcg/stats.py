"""Counters the software CPU keeps, read like KVM's binary stats fd.

KVM counts in the kernel what it handled there; the tcg vCPU counts what `run()` returned
and what it did without returning: exceptions it delivered to a real-mode guest's handler,
and each entry into Unicorn (`uc_emu_start`). Where KVM has a counter of the same meaning,
the name is KVM's (`exits`, `io_exits`, `mmio_exits`, `halt_exits`, `signal_exits`,
`insn_emulation_fail`). Instructions executed are not counted: Unicorn counts them for its
`count=` limit but does not expose the counter.
"""
from __future__ import annotations

import functools
import operator

from ...kvm.abi import StatType, StatUnit
from ...kvm.stats import StatDescriptor

NAMES = ("exits", "io_exits", "mmio_exits", "halt_exits", "signal_exits", "debug_exits",
         "shutdown_exits", "insn_emulation_fail", "exception_injections", "emu_starts")
INDEX = {name: i for i, name in enumerate(NAMES)}


class TcgStats:
    """The reading surface of `vlab.kvm.StatsFd` over one vCPU's live counters."""

    def __init__(self, counts: list[int], owner: str):
        self._counts = counts
        self.owner = owner
        # as the kernel describes its counters: cumulative, no unit, one u64 each
        self.descriptors = [StatDescriptor(name, StatType.CUMULATIVE, StatUnit.NONE, 0, 1, 8 * i, 0)
                            for i, name in enumerate(NAMES)]

    def names(self) -> list[str]:
        return list(NAMES)

    def read_raw(self) -> tuple[int, ...]:
        return tuple(self._counts)

    def selector(self, names):
        """`StatsFd.selector`: a reader of only these counters, in the order returned."""
        chosen = tuple(n for n in NAMES if n in set(names))
        index = [INDEX[n] for n in chosen]
        if len(index) > 1:   # itemgetter of several gives a tuple, without a Python frame
            return chosen, functools.partial(operator.itemgetter(*index), self._counts)
        read = self._counts.__getitem__
        return chosen, lambda: tuple(map(read, index))

    def indices(self, names) -> tuple[int, ...]:
        """Where `selector(names)`'s counters lie in the vCPU's list, in the same order."""
        return tuple(INDEX[n] for n in NAMES if n in set(names))

    def read(self) -> dict[str, int]:
        return dict(zip(NAMES, self._counts))

    def scalars(self, words: tuple[int, ...]) -> dict[str, int]:
        return dict(zip(NAMES, words))

    def delta(self, before: tuple[int, ...], after: tuple[int, ...]) -> dict[str, int]:
        """Counters that changed between two `read_raw()` results."""
        return {name: b - a for name, a, b in zip(NAMES, before, after) if a != b}

    def close(self) -> None:
        """Nothing to release: the counters live in the vCPU."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
