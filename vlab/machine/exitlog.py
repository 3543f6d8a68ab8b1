"""Every exit that reached userspace, with what KVM did in between.

A record holds the decoded exit, RIP, the device that handled it, how long KVM_RUN took,
and KVM's vCPU counters read right after it. The counters of consecutive records give the
work the kernel did on its own between two userspace exits (instructions emulated, exits
handled in the kernel, halts...). Deltas are computed when asked, not on the exit path.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

from ..kvm.abi import ExitReason
from ..kvm.exits import Exit, IoIn, IoOut, MmioRead, MmioWrite, OtherExit


@dataclass(slots=True)
class ExitRecord:
    vcpu: int
    exit: Exit
    rip: int
    device: str | None
    claimed: bool
    duration_s: float
    counters_before: tuple[int, ...] | None
    counters_after: tuple[int, ...] | None
    seq: int = 0

    @property
    def reason(self) -> str:
        return reason_label(self.exit)


_LABELS = {IoOut: "IO out", IoIn: "IO in", MmioRead: "MMIO read", MmioWrite: "MMIO write"}


def reason_label(exit: Exit) -> str:
    """The histogram's name for an exit: KVM_EXIT_* name, IO and MMIO split by direction."""
    return _LABELS.get(exit.__class__) or exit.reason.name


class ExitLog:
    """The exits of one or more vCPUs: the last `keep` records, and counts of all of them."""

    def __init__(self, counter_names: tuple[str, ...] = (), keep: int = 100_000):
        self.counter_names = counter_names
        self.records: deque[ExitRecord] = deque(maxlen=keep)
        self.total = 0
        self._by_class: Counter = Counter()
        self._listeners: list = []

    def append(self, record: ExitRecord) -> None:
        self.total += 1
        record.seq = self.total
        self.records.append(record)
        cls = record.exit.__class__
        self._by_class[cls if cls is not OtherExit else record.exit.reason] += 1
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
        for cls, n in self._by_class.items():
            counts[cls.name if isinstance(cls, ExitReason) else _LABELS.get(cls) or cls.reason.name] += n
        return dict(counts.most_common())

    def kernel_delta(self, record: ExitRecord) -> dict[str, int]:
        """KVM's counters that moved between the previous userspace exit and this one."""
        before, after = record.counters_before, record.counters_after
        if before is None or after is None:
            return {}
        return {name: b - a for name, a, b in zip(self.counter_names, before, after) if b != a}

    def kernel_totals(self) -> dict[str, int]:
        """KVM's counters summed over the kept records: what the kernel did meanwhile."""
        first = next((r for r in self.records if r.counters_before is not None), None)
        last = self.last
        if first is None or last is None or last.counters_after is None:
            return {}
        return {name: b - a for name, a, b in
                zip(self.counter_names, first.counters_before, last.counters_after)}

    def clear(self) -> None:
        self.records.clear()
        self.total = 0
        self._by_class.clear()

    def to_dataframe(self):
        """The kept records as a pandas DataFrame, one row per exit, kernel deltas as columns."""
        import pandas as pd
        rows = []
        for r in self.records:
            row = {"seq": r.seq, "vcpu": r.vcpu, "reason": r.reason, "rip": r.rip,
                   "detail": r.exit.describe(), "device": r.device, "claimed": r.claimed,
                   "kvm_run_us": r.duration_s * 1e6}
            row.update({f"kvm.{k}": v for k, v in self.kernel_delta(r).items()})
            rows.append(row)
        return pd.DataFrame(rows).fillna(0) if rows else pd.DataFrame()

    def __str__(self) -> str:
        hist = self.histogram()
        lines = [f"{self.total} userspace exits"]
        lines += [f"  {name:<16} {count}" for name, count in hist.items()]
        return "\n".join(lines)

