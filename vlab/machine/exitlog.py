"""Every exit that reached userspace, with what KVM did in between.

A record holds the decoded exit, RIP, the device that handled it, how long KVM_RUN took,
and KVM's vCPU counters read right after it. The counters of consecutive records give the
work the kernel did on its own between two userspace exits (instructions emulated, exits
handled in the kernel, halts...). Deltas are computed when asked, not on the exit path.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..kvm.abi import ExitReason
from ..kvm.exits import Exit, IoIn, IoOut, MmioRead, MmioWrite, OtherExit
from ..kvm.kernel_events import KvmEmulateInsn, KvmUserspaceExit, exit_outcomes


@dataclass(slots=True)
class ExitRecord:
    vcpu: int
    exit: Exit
    rip: int            # as KVM reports it: an OUT's is at it or past it (Backend.out_exit_rip)
    device: str | None
    claimed: bool
    duration_s: float
    counters_before: tuple[int, ...] | None
    counters_after: tuple[int, ...] | None
    seq: int = 0
    kernel_events: Sequence = ()   # what the kernel traced inside this KVM_RUN (KernelTrace)

    @property
    def reason(self) -> str:
        return reason_label(self.exit)


_LABELS = {IoOut: "IO out", IoIn: "IO in", MmioRead: "MMIO read", MmioWrite: "MMIO write"}


def reason_label(exit: Exit) -> str:
    """The histogram's name for an exit: KVM_EXIT_* name, IO and MMIO split by direction."""
    return _LABELS.get(exit.__class__) or exit.reason.name


@dataclass(frozen=True)
class KernelExitRow:
    reason: str         # as the kernel names it: kvm_exit's reason, else kvm_userspace_exit's
    in_kernel: int      # handled by KVM, which entered the guest again
    userspace: int      # ended a KVM_RUN


@dataclass(frozen=True)
class KernelExitCounts:
    """kvm_stat's table over traced KVM_RUNs: each exit reason, how often KVM handled it
    itself and how often it reached userspace. A KVM_RUN that returned without a hardware
    exit (kvm_pvm, whose emulator traces none; EINTR before entering) counts under its
    kvm_userspace_exit reason (KVM_EXIT_IO, EINTR...)."""
    rows: tuple[KernelExitRow, ...]
    runs: int           # traced KVM_RUNs counted
    emulated: int       # instructions KVM's emulator ran (kvm_emulate_insn)

    def __str__(self) -> str:
        width = max([len(r.reason) for r in self.rows] + [len("exit reason")])
        lines = [f"{'exit reason':<{width}}  {'in kernel':>9}  {'to userspace':>12}"]
        lines += [f"{r.reason:<{width}}  {r.in_kernel:>9,}  {r.userspace:>12,}" for r in self.rows]
        lines.append(f"{self.runs:,} KVM_RUNs traced, {self.emulated:,} instructions emulated in the kernel")
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame([(r.reason, r.in_kernel, r.userspace) for r in self.rows],
                            columns=["reason", "in_kernel", "userspace"])


class ExitLog:
    """The exits of one or more vCPUs: the last `keep` records, and counts of all of them."""

    def __init__(self, counter_names: tuple[str, ...] = (), keep: int = 100_000):
        self.counter_names = counter_names
        self.records: deque[ExitRecord] = deque(maxlen=keep)
        self.total = 0
        # Written by the vCPU thread, read by views from others: readers take a copy, which
        # (a dict's C-level copy) no append can interleave with, so the exit path needs no lock.
        self._by_class: dict = {}
        self._listeners: list = []

    def append(self, record: ExitRecord) -> None:
        self.total = record.seq = self.total + 1
        self.records.append(record)
        cls = record.exit.__class__
        key = cls if cls is not OtherExit else record.exit.reason
        counts = self._by_class
        counts[key] = counts.get(key, 0) + 1
        if self._listeners:
            for listener in self._listeners:
                listener(record)

    def subscribe(self, listener) -> None:
        """Call `listener(record)` on every new exit (views throttle their own redraws)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def last(self) -> ExitRecord | None:
        return self.records[-1] if self.records else None

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[ExitRecord]:
        return iter(self.records)

    def histogram(self) -> dict[str, int]:
        """Userspace exits by reason, most frequent first (over every exit, not just kept ones)."""
        counts: Counter = Counter()
        for cls, n in self._by_class.copy().items():
            counts[cls.name if isinstance(cls, ExitReason) else _LABELS.get(cls) or cls.reason.name] += n
        return dict(counts.most_common())

    def _deltas(self, record: ExitRecord) -> tuple[int, ...] | None:
        before, after = record.counters_before, record.counters_after
        if before is None or after is None:
            return None
        return tuple(b - a for a, b in zip(before, after))

    def kernel_delta(self, record: ExitRecord) -> dict[str, int]:
        """KVM's counters that moved between the previous userspace exit and this one."""
        deltas = self._deltas(record)
        if deltas is None:
            return {}
        return {name: d for name, d in zip(self.counter_names, deltas) if d}

    def kernel_totals(self) -> dict[str, int]:
        """KVM's counters summed over the kept records: what the kernel did meanwhile.
        Summing each record's own delta stays right when several vCPUs share the log."""
        totals = [0] * len(self.counter_names)
        seen = False
        for record in self.records:
            deltas = self._deltas(record)
            if deltas is not None:
                seen = True
                totals = [t + d for t, d in zip(totals, deltas)]
        return dict(zip(self.counter_names, totals)) if seen else {}

    def kernel_exit_table(self) -> KernelExitCounts:
        """The kept records' kernel events (vlab.Lab(kernel_trace=True)) by exit reason:
        handled inside KVM_RUN, or the one that ended it, most frequent first."""
        in_kernel: Counter = Counter()
        userspace: Counter = Counter()
        runs = emulated = 0
        for record in list(self.records):
            events = record.kernel_events
            if not events:
                continue
            runs += 1
            reached = False
            for exit, handled in exit_outcomes(events):
                (in_kernel if handled else userspace)[exit.reason_name] += 1
                reached = reached or not handled
            if not reached and isinstance(events[-1], KvmUserspaceExit):
                userspace[events[-1].reason_name] += 1
            emulated += sum(1 for e in events if e.__class__ is KvmEmulateInsn)
        reasons = sorted(in_kernel.keys() | userspace.keys(),
                         key=lambda r: (-in_kernel[r] - userspace[r], r))
        return KernelExitCounts(tuple(KernelExitRow(r, in_kernel[r], userspace[r]) for r in reasons),
                                runs, emulated)

    def clear(self) -> None:
        self.records.clear()
        self.total = 0
        self._by_class.clear()

    def to_dataframe(self):
        """The kept records as a pandas DataFrame, one row per exit, with a `kvm.NAME` column
        per kernel counter holding its delta since the previous exit."""
        import pandas as pd
        kernel = [f"kvm.{name}" for name in self.counter_names]
        rows = []
        for r in self.records:
            row = [r.seq, r.vcpu, r.reason, r.rip, r.exit.describe(), r.device, r.claimed,
                   r.duration_s * 1e6]
            deltas = self._deltas(r)
            rows.append(row + list(deltas if deltas is not None else [None] * len(kernel)))
        return pd.DataFrame(rows, columns=["seq", "vcpu", "reason", "rip", "detail", "device",
                                           "claimed", "kvm_run_us", *kernel])

    def __str__(self) -> str:
        hist = self.histogram()
        lines = [f"{self.total} userspace exits"]
        lines += [f"  {name:<16} {count}" for name, count in hist.items()]
        return "\n".join(lines)

