"""Every exit that reached userspace, with what KVM did in between.

A record holds the decoded exit, RIP, the device that handled it, how long KVM_RUN took,
and KVM's vCPU counters read right after it. The counters of consecutive records give the
work the kernel did on its own between two userspace exits (instructions emulated, exits
handled in the kernel, halts...).

The log keeps its last `keep` records as fixed 64-byte rows in one buffer (a ring), so a
million of them take 61 MiB, and the compiled run loop (`_runloop.c`) writes a row without
making a Python object. Each row holds the exit's fields, RIP, a device number, the KVM_RUN
time and each counter's delta since the vCPU's previous exit; an `ExitRecord` is made when a
reader asks for one, its absolute counters summed back from the vCPU's latest reading, or from
the nearest later checkpoint (every CHECKPOINT rows, the vCPUs' counters there, kept as reads
pass it), so a read anywhere sums a few hundred deltas at most once the log has been read. What
does not fit a row (a `rep outs`, a DEBUG exit's registers, a delta above 65,535, the kernel's
trace events) is kept beside it, by sequence number.
"""
from __future__ import annotations

import struct
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..kvm.abi import ExitReason
from ..kvm.exits import Exit, Hlt, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, OtherExit
from ..kvm.kernel_events import KvmEmulateInsn, KvmUserspaceExit, exit_outcomes

try:   # the compiled rows (setup.py builds it where it can); else appended in Python
    from . import _runloop
except ImportError:
    _runloop = None
else:
    _runloop.setup(IoOut, IoIn, MmioRead, MmioWrite, Hlt, Interrupted)


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


def _key_label(key) -> str:
    return key.name if isinstance(key, ExitReason) else _LABELS.get(key) or key.reason.name


# One row: rip, address (port or guest-physical address), value (the data written, as an
# integer; an IN's data_offset), KVM_RUN seconds (a 32-bit float), vCPU, device number,
# kind, size, flags, and the counters' deltas. _runloop.c writes the same (its `struct row`).
ROW = struct.Struct("<QQQfHHBBBx14H")
MAX_COUNTERS = 14
DELTA_MAX = 0xFFFF
# kind: a number per histogram key; these six are rebuilt from the row alone
IO_OUT, IO_IN, MMIO_READ, MMIO_WRITE, HLT, INTR = 1, 2, 3, 4, 5, 6
_FIXED_KINDS = {IoOut: IO_OUT, IoIn: IO_IN, MmioRead: MMIO_READ, MmioWrite: MMIO_WRITE,
                Hlt: HLT, Interrupted: INTR}
# flags
CLAIMED, HAS_COUNTERS, SIDE_EXIT, SIDE_DELTAS, SIDE_EVENTS = 1, 2, 4, 8, 16
_KINDS = 256          # counts: [0] the total, [kind] per histogram key, [GENERATION] below
GENERATION = _KINDS - 1   # bumped when the rows or the latest counters are replaced
FIRST_SEEN = _KINDS   # counts[FIRST_SEEN + kind]: the seq of that kind's first exit
_FIRST_ROWS = 1024    # rows allocated at first; doubled up to `keep`
CHECKPOINT = 512      # seqs between two checkpoints of the vCPUs' counters (a million
#                       records: 2,000 checkpoints, about 1.5 MiB beside their 61 MiB of rows)


def _row_fields(exit: Exit) -> tuple[int, int, int, int] | None:
    """(kind, address, value, size) of an exit a row holds whole, else None."""
    cls = exit.__class__
    if cls is IoOut:
        if exit.count == 1 and len(exit.data) == exit.size:
            return IO_OUT, exit.port, int.from_bytes(exit.data, "little"), exit.size
    elif cls is IoIn:
        if exit.count == 1:
            return IO_IN, exit.port, exit.data_offset, exit.size
    elif cls is MmioWrite:
        if len(exit.data) == exit.length <= 8:
            return MMIO_WRITE, exit.address, int.from_bytes(exit.data, "little"), exit.length
    elif cls is MmioRead:
        if exit.length <= 0xFF:
            return MMIO_READ, exit.address, 0, exit.length
    elif cls is Hlt:
        return HLT, 0, 0, 0
    elif cls is Interrupted:
        return INTR, 0, 0, 0
    return None


def _row_exit(kind: int, address: int, value: int, size: int) -> Exit:
    if kind == IO_OUT:
        return IoOut(address, size, 1, value.to_bytes(size, "little"))
    if kind == IO_IN:
        return IoIn(address, size, 1, value)
    if kind == MMIO_READ:
        return MmioRead(address, size)
    if kind == MMIO_WRITE:
        return MmioWrite(address, size, value.to_bytes(size, "little"))
    return Hlt() if kind == HLT else Interrupted()


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


class KeptRecords:
    """The kept records as a read-only sequence, oldest first; each `ExitRecord` is made
    when asked for (`records[-1]`, iteration, `reversed`)."""

    def __init__(self, log: "ExitLog"):
        self._log = log

    def __len__(self) -> int:
        return self._log.kept

    def __getitem__(self, index: int) -> ExitRecord:
        log = self._log
        first, last = log._window()
        n = last - first + 1
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("exit record index out of range")
        return log._record(first + index)

    def __iter__(self) -> Iterator[ExitRecord]:
        return reversed(list(reversed(self)))

    def __reversed__(self) -> Iterator[ExitRecord]:
        return self._log._newest_first()


class ExitLog:
    """The exits of one or more vCPUs: the last `keep` records, and counts of all of them."""

    def __init__(self, counter_names: tuple[str, ...] = (), keep: int = 100_000):
        if keep < 1:
            raise ValueError(f"keep={keep}: a log keeps at least one record")
        self.counter_names = counter_names
        self.keep = keep
        self._rows = bytearray(ROW.size * min(keep, _FIRST_ROWS))
        # [0]: every exit appended since the last clear(); [kind]: those of each kind. Written
        # in place by the vCPU thread (and _runloop.c) while views read it from others.
        self._counts = array("Q", bytes(16 * _KINDS))
        self._keys: list = [None, IoOut, IoIn, MmioRead, MmioWrite, Hlt, Interrupted]
        self._kind_of: dict = {key: kind for kind, key in enumerate(self._keys) if kind}
        self._devices: list[str | None] = [None]     # device number -> name
        self._device_number: dict[str | None, int] = {None: 0}
        self._latest: dict[int, array] = {}          # vCPU -> its counters after its last exit
        self._breaks: dict[int, tuple | None] = {}   # seq -> the vCPU's counters before it, when
        #                                              they are not its previous record's after
        self._side: dict[int, tuple] = {}            # seq -> (exit, deltas, kernel events)
        # seq (a multiple of CHECKPOINT) -> each vCPU's counters after its last record up
        # to that seq: a fact once written, taken as a backward read passes it
        self._checkpoints: dict[int, dict[int, tuple | None]] = {}
        self._listeners: list = []

    # -- writing --------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Every exit appended since the log began (or was cleared), kept or not."""
        return self._counts[0]

    def append(self, record: ExitRecord) -> None:
        if _runloop is None or not _runloop.append(self, record):
            self._append_row(record)
        if self._listeners:
            for listener in self._listeners:
                listener(record)

    def _append_row(self, record: ExitRecord) -> None:
        """`append`, for any record (the compiled one takes only those a row holds whole)."""
        counts = self._counts
        seq = record.seq = counts[0] + 1
        exit = record.exit
        fields = _row_fields(exit)
        flags = CLAIMED if record.claimed else 0
        side_exit = side_deltas = None
        if fields is None:
            cls = exit.__class__
            key = cls if cls is not OtherExit else exit.reason
            kind = self._kind_of.get(key) or self._new_kind(key)
            address = value = size = 0
            side_exit, flags = exit, flags | SIDE_EXIT
        else:
            kind, address, value, size = fields
        before, after = record.counters_before, record.counters_after
        deltas = _NO_DELTAS
        if after is not None and before is not None:
            flags |= HAS_COUNTERS
            deltas = tuple(map(int.__sub__, after, before))
            if len(deltas) > MAX_COUNTERS:
                side_deltas, deltas, flags = deltas, _NO_DELTAS, flags | SIDE_DELTAS
            else:
                deltas += _NO_DELTAS[len(deltas):]
            vcpu = record.vcpu
            latest = self._latest.get(vcpu)
            if latest is None:
                self._breaks[seq] = None
                self._latest[vcpu] = array("Q", after)
            else:
                if latest.tolist() != list(before):
                    self._breaks[seq] = tuple(latest)
                latest[:] = array("Q", after)
        device = self._device_number.get(record.device)
        if device is None:
            device = self.device_number(record.device)
        index = (seq - 1) % self.keep
        if (index + 1) * ROW.size > len(self._rows):
            self.grow()
        events = record.kernel_events
        if events:
            flags |= SIDE_EVENTS
        head = (record.rip, address, value, record.duration_s, record.vcpu, device, kind, size)
        try:
            ROW.pack_into(self._rows, index * ROW.size, *head, flags, *deltas)
        except struct.error:
            if not flags & HAS_COUNTERS or flags & SIDE_DELTAS:
                raise
            # a delta below 0 (counters reset) or above a row's 16 bits: kept aside whole
            side_deltas, flags = deltas[:len(after)], flags | SIDE_DELTAS
            ROW.pack_into(self._rows, index * ROW.size, *head, flags, *_NO_DELTAS)
        if flags & (SIDE_EXIT | SIDE_DELTAS | SIDE_EVENTS):
            self._keep_aside(seq, (side_exit, side_deltas, events or ()))
        if not counts[kind]:
            counts[FIRST_SEEN + kind] = seq
        counts[kind] += 1
        counts[0] = seq

    def _announce(self) -> None:
        """Tell the listeners of the last record (the compiled loop wrote its row)."""
        record = self.last
        for listener in self._listeners:
            listener(record)

    def _new_kind(self, key) -> int:
        kind = len(self._keys)
        if kind >= GENERATION:
            raise OverflowError(f"an exit log tells {GENERATION - 1} kinds of exit apart")
        self._keys.append(key)
        self._kind_of[key] = kind
        return kind

    def device_number(self, name: str | None) -> int:
        """The number a row stores for a device name (the compiled loop asks for it once)."""
        number = self._device_number.get(name)
        if number is None:
            number = self._device_number[name] = len(self._devices)
            self._devices.append(name)
        return number

    def _keep_aside(self, seq: int, entry: tuple) -> None:
        side = self._side
        oldest = seq - self.keep
        while side and next(iter(side)) <= oldest:   # seqs in order: drop those overwritten
            del side[next(iter(side))]
        side[seq] = entry

    def grow(self) -> None:
        """Double the rows (up to `keep`). A new buffer, not a resize: a DataFrame or the
        compiled loop may hold a view of the old one."""
        rows = bytearray(ROW.size * min(self.keep, 2 * len(self._rows) // ROW.size))
        rows[:len(self._rows)] = self._rows
        self._rows = rows
        self._counts[GENERATION] += 1

    def subscribe(self, listener) -> None:
        """Call `listener(record)` on every new exit (views throttle their own redraws)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def clear(self) -> None:
        generation = self._counts[GENERATION]
        self._counts[:] = array("Q", bytes(16 * _KINDS))
        self._counts[GENERATION] = generation + 1
        self._latest.clear()
        self._breaks.clear()
        self._side.clear()
        self._checkpoints.clear()

    # -- reading --------------------------------------------------------------------------
    @property
    def kept(self) -> int:
        return min(self.total, self.keep)

    @property
    def first_seq(self) -> int:
        """The seq of the oldest kept record (1 until the ring wraps around)."""
        return self._window()[0]

    @property
    def records(self) -> KeptRecords:
        return KeptRecords(self)

    @property
    def last(self) -> ExitRecord | None:
        while True:   # the vCPU thread may append meanwhile: a consistent reading
            total = self.total
            if not total:
                return None
            row = self._row(total)
            before = after = None
            if row[8] & HAS_COUNTERS and row[4] in self._latest:
                after = tuple(self._latest[row[4]])
                deltas = self._side[total][1] if row[8] & SIDE_DELTAS else row[9:9 + len(after)]
                before = tuple(map(int.__sub__, after, deltas))
            if total == self.total:
                return self._make(total, row, before, after)

    def record(self, seq: int) -> ExitRecord:
        """The kept record numbered `seq` (IndexError if it is no longer kept)."""
        first, last = self._window()
        if not first <= seq <= last:
            raise IndexError(f"exit {seq} is not kept (the log keeps {first} to {last})")
        return self._record(seq)

    def continues(self, vcpu: int, counters_before: tuple[int, ...] | None) -> bool:
        """Whether a record of `vcpu` with these counters before it continues that vCPU's
        last one (its counters after are these): the compiled loop then writes rows."""
        latest = self._latest.get(vcpu)
        return latest is not None and counters_before is not None \
            and tuple(latest) == tuple(counters_before)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[ExitRecord]:
        return iter(self.records)

    def _window(self) -> tuple[int, int]:
        """The first and last kept seq."""
        total = self.total
        return max(1, total - self.keep + 1), total

    def _row(self, seq: int) -> tuple:
        return ROW.unpack_from(self._rows, (seq - 1) % self.keep * ROW.size)


    def _make(self, seq: int, row: tuple, before, after) -> ExitRecord:
        rip, address, value, duration, vcpu, device, kind, size, flags = row[:9]
        side = self._side.get(seq) if flags & (SIDE_EXIT | SIDE_EVENTS) else None
        exit = side[0] if flags & SIDE_EXIT else _row_exit(kind, address, value, size)
        return ExitRecord(vcpu, exit, rip, self._devices[device], bool(flags & CLAIMED),
                          duration, before, after, seq, side[2] if flags & SIDE_EVENTS else ())

    def _newest_first(self, stop: int = 0) -> Iterator[ExitRecord]:
        """The kept records from the newest back to seq `stop` (the oldest kept if 0), each
        vCPU's counters summed back from its latest reading."""
        return (self._make(*each) for each in self._back_from(*self._reading(), stop))

    def _reading(self) -> tuple[int, dict]:
        """The last seq and each vCPU's counters after its last record, read together."""
        while True:   # the vCPU thread may append meanwhile: a consistent reading
            total = self.total
            after = {vcpu: tuple(latest) for vcpu, latest in self._latest.items()}
            if total == self.total:
                return total, after

    def _back_from(self, start: int, after: dict, stop: int) -> Iterator[tuple]:
        """(seq, row, counters before, counters after) of each kept record from seq `start`
        back to `stop` (the oldest kept if 0), `after` holding each vCPU's counters after
        its last record up to `start`; the checkpoints passed on the way are kept."""
        first = max(1, self.total - self.keep + 1, stop)
        breaks, checkpoints = self._breaks, self._checkpoints
        if len(checkpoints) > self.keep // CHECKPOINT + 1:   # drop those before the window
            oldest = self.total - self.keep
            for seq in [seq for seq in checkpoints if seq <= oldest]:
                del checkpoints[seq]
        for seq in range(start, first - 1, -1):
            if seq <= self.total - self.keep:
                return   # the vCPU thread has written over the rest meanwhile
            if not seq % CHECKPOINT and seq not in checkpoints:
                checkpoints[seq] = after.copy()
            row = self._row(seq)
            before = counters = None
            if row[8] & HAS_COUNTERS:
                vcpu = row[4]
                counters = after.get(vcpu)
                if counters is not None:
                    deltas = (self._side[seq][1] if row[8] & SIDE_DELTAS
                              else row[9:9 + len(counters)])
                    before = tuple(map(int.__sub__, counters, deltas))
                    after[vcpu] = breaks[seq] if seq in breaks else before
            yield seq, row, before, counters

    def _record(self, seq: int) -> ExitRecord:
        """Record `seq`, its counters summed back from the first checkpoint after it (from
        the latest reading where none is kept yet)."""
        checkpoints = self._checkpoints
        start, after = next(((c, after) for c in range(-(-seq // CHECKPOINT) * CHECKPOINT,
                                                       self.total + 1, CHECKPOINT)
                             if (after := checkpoints.get(c)) is not None), None) \
            or self._reading()
        for each in self._back_from(start, dict(after), seq):
            if each[0] == seq:
                return self._make(*each)
        raise IndexError(f"exit {seq} is no longer kept")

    def histogram(self) -> dict[str, int]:
        """Userspace exits by reason, most frequent first, ties in the order they first
        happened (over every exit, not just kept ones)."""
        counts: Counter = Counter()
        kinds = self._counts.tolist()
        seen = sorted((kinds[FIRST_SEEN + kind], kind) for kind in range(1, len(self._keys))
                      if kinds[kind])   # never GENERATION: _new_kind stops before it
        for _, kind in seen:
            counts[_key_label(self._keys[kind])] += kinds[kind]
        return dict(counts.most_common())

    def kernel_delta(self, record: ExitRecord) -> dict[str, int]:
        """KVM's counters that moved between the previous userspace exit and this one."""
        before, after = record.counters_before, record.counters_after
        if before is None or after is None:
            return {}
        return {name: b - a for name, a, b in zip(self.counter_names, before, after) if b != a}

    def kernel_totals(self) -> dict[str, int]:
        """KVM's counters summed over the kept records: what the kernel did meanwhile.
        Summing each record's own delta stays right when several vCPUs share the log."""
        first, last = self._window()
        n = len(self.counter_names)
        if not last or not n:
            return {}
        rows = memoryview(self._rows)[:self.kept * ROW.size]
        flags = rows[34::ROW.size]
        if not any(f & HAS_COUNTERS for f in flags):
            return {}
        words = rows.cast("H")   # a delta is the 18th+i halfword of its 32
        totals = [sum(words[18 + i::ROW.size // 2]) for i in range(min(n, MAX_COUNTERS))]
        totals += [0] * (n - len(totals))
        for seq, (_, deltas, _) in self._side.copy().items():   # a copy: the vCPU thread may add
            if deltas is not None and seq >= first:
                totals = [t + d for t, d in zip(totals, deltas)]
        return dict(zip(self.counter_names, totals))

    def kernel_exit_table(self) -> KernelExitCounts:
        """The kept records' kernel events (vlab.Lab(kernel_trace=True)) by exit reason:
        handled inside KVM_RUN, or the one that ended it, most frequent first."""
        in_kernel: Counter = Counter()
        userspace: Counter = Counter()
        runs = emulated = 0
        first, _ = self._window()
        for seq, (_, _, events) in self._side.copy().items():
            if not events or seq < first:
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

    def columns(self):
        """The kept rows as a numpy structured array, oldest first: a view of the log's own
        buffer while it has not wrapped around (a copy in order once it has)."""
        import numpy as np
        dtype = np.dtype([("rip", "<u8"), ("address", "<u8"), ("value", "<u8"),
                          ("duration_s", "<f4"), ("vcpu", "<u2"), ("device", "<u2"),
                          ("kind", "u1"), ("size", "u1"), ("flags", "u1"), ("pad", "u1"),
                          ("deltas", "<u2", (MAX_COUNTERS,))])
        rows = np.frombuffer(self._rows, dtype)
        total, kept = self.total, self.kept
        if total <= self.keep:
            return rows[:kept]
        start = total % self.keep
        return np.concatenate((rows[start:], rows[:start]))

    def to_dataframe(self):
        """The kept records as a pandas DataFrame, one row per exit, with a `kvm.NAME` column
        per kernel counter holding its delta since the previous exit."""
        import numpy as np
        import pandas as pd
        rows = self.columns()
        first, last = self._window()
        kernel = [f"kvm.{name}" for name in self.counter_names]
        labels = np.array([None] + [_key_label(k) for k in self._keys[1:]], dtype=object)
        devices = np.array(self._devices, dtype=object)
        seqs = np.arange(first, last + 1) if last else np.arange(0)
        frame = {"seq": seqs, "vcpu": rows["vcpu"], "reason": labels[rows["kind"]],
                 "rip": rows["rip"], "detail": [r.exit.describe() for r in self.records],
                 "device": devices[rows["device"]], "claimed": (rows["flags"] & CLAIMED) != 0,
                 "kvm_run_us": rows["duration_s"].astype(np.float64) * 1e6}
        deltas = np.zeros((len(rows), len(kernel)), np.int64)
        deltas[:, :MAX_COUNTERS] = rows["deltas"][:, :len(kernel)]
        for seq, (_, side_deltas, _) in self._side.copy().items():
            if side_deltas is not None and seq >= first:
                deltas[seq - first, :] = side_deltas
        measured = (rows["flags"] & HAS_COUNTERS) != 0
        for i, name in enumerate(kernel):
            column = deltas[:, i]
            frame[name] = column if measured.all() else pd.array(
                np.where(measured, column, 0), dtype="Int64").where(measured)
        return pd.DataFrame(frame, columns=["seq", "vcpu", "reason", "rip", "detail", "device",
                                            "claimed", "kvm_run_us", *kernel], copy=False)

    def __str__(self) -> str:
        hist = self.histogram()
        lines = [f"{self.total} userspace exits"]
        lines += [f"  {name:<16} {count}" for name, count in hist.items()]
        return "\n".join(lines)


_NO_DELTAS = (0,) * MAX_COUNTERS
