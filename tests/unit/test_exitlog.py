"""The exit log: histogram, kernel counter deltas, the keep limit, listeners, DataFrame export,
and its rows: every record reads back as it was appended, in the ring and beside it."""
from __future__ import annotations

import pandas as pd
import pytest

from vlab.kvm import ExitReason
from vlab.kvm.exits import (Debug, Hlt, InternalError, Interrupted, IoIn, IoOut, MmioRead,
                            MmioWrite, OtherExit)
from vlab.machine import exitlog
from vlab.machine.exitlog import ExitLog, ExitRecord

COUNTERS = ("exits", "insn_emulation", "halt_exits")


def record(exit, counters=None, *, vcpu=0, device=None, rip=0x1000):
    """A record whose kernel counters went from `counters[0]` to `counters[1]`."""
    before, after = counters if counters else (None, None)
    return ExitRecord(vcpu, exit, rip, device, device is not None, 2e-6, before, after)


def out(port=0xE9):
    return IoOut(port, 1, 1, b"x")


def test_histogram_names_reasons_and_splits_directions():
    log = ExitLog()
    for exit in [out(), out(), out(), IoIn(0x3FD, 1, 1, 0), MmioRead(0xD000_0000, 4),
                 MmioWrite(0xD000_0000, 4, bytes(4)), Interrupted(), Hlt(),
                 OtherExit(ExitReason.HYPERCALL), OtherExit(ExitReason.HYPERCALL)]:
        log.append(record(exit))
    histogram = log.histogram()
    assert histogram == {"IO out": 3, "HYPERCALL": 2, "IO in": 1, "MMIO read": 1,
                         "MMIO write": 1, "INTR": 1, "HLT": 1}
    assert list(histogram)[:2] == ["IO out", "HYPERCALL"]  # most frequent first
    assert len(log) == 10
    assert str(log).splitlines()[:2] == ["10 userspace exits", "  IO out           3"]


def test_records_are_numbered_in_order():
    log = ExitLog()
    for _ in range(3):
        log.append(record(out()))
    assert [r.seq for r in log] == [1, 2, 3]
    assert log.last.seq == 3


def test_keep_limit_drops_old_records_but_counts_them_all():
    log = ExitLog(keep=4)
    for i in range(10):
        log.append(record(out() if i % 2 else Hlt(), rip=i))
    assert len(log.records) == 4
    assert [r.seq for r in log] == [7, 8, 9, 10]
    assert [r.rip for r in log] == [6, 7, 8, 9]
    assert len(log) == 10
    assert log.histogram() == {"HLT": 5, "IO out": 5}


def test_kernel_delta_lists_only_counters_that_moved():
    log = ExitLog(COUNTERS)
    r = record(out(), ((10, 500, 1), (11, 1524, 1)))
    log.append(r)
    assert log.kernel_delta(r) == {"exits": 1, "insn_emulation": 1024}
    assert log.kernel_delta(record(out())) == {}  # no stats fd: no deltas


def test_kernel_totals_sum_the_kept_records():
    log = ExitLog(COUNTERS)
    log.append(record(out(), ((10, 500, 0), (11, 600, 0))))
    log.append(record(out(), ((11, 600, 0), (12, 700, 0))))
    log.append(record(Hlt(), ((12, 700, 0), (13, 703, 1))))
    assert log.kernel_totals() == {"exits": 3, "insn_emulation": 203, "halt_exits": 1}


def test_kernel_totals_with_two_vcpus_interleaved():
    """Each vCPU has its own counters; the totals add both vCPUs' work, not the difference
    between one vCPU's first reading and the other's last."""
    log = ExitLog(COUNTERS)
    log.append(record(out(), ((100, 0, 0), (101, 50, 0)), vcpu=0))
    log.append(record(out(), ((5, 0, 0), (6, 7, 0)), vcpu=1))
    log.append(record(out(), ((101, 50, 0), (102, 60, 0)), vcpu=0))
    assert log.kernel_totals() == {"exits": 3, "insn_emulation": 67, "halt_exits": 0}


def test_kernel_totals_without_counters():
    log = ExitLog()
    log.append(record(out()))
    assert log.kernel_totals() == {}


def test_to_dataframe_one_row_per_kept_exit():
    log = ExitLog(COUNTERS)
    log.append(record(out(0x80), ((1, 5, 0), (2, 9, 0)), rip=0x1002))
    log.append(record(Hlt(), ((2, 9, 0), (3, 9, 1)), device="debugcon", rip=0x1005))
    df = log.to_dataframe()
    assert list(df.columns) == ["seq", "vcpu", "reason", "rip", "detail", "device", "claimed",
                                "kvm_run_us", "kvm.exits", "kvm.insn_emulation", "kvm.halt_exits"]
    assert df["reason"].tolist() == ["IO out", "HLT"]
    assert df["rip"].tolist() == [0x1002, 0x1005]
    assert df["detail"][0] == "IO out port 0x80 size 1 data 78"
    assert pd.isna(df["device"][0]) and df["device"][1] == "debugcon"
    assert df["claimed"].tolist() == [False, True]
    assert df["kvm_run_us"].tolist() == pytest.approx([2.0, 2.0])
    assert df["kvm.insn_emulation"].tolist() == [4, 0]
    assert df["kvm.halt_exits"].tolist() == [0, 1]
    assert df["kvm.exits"].dtype.kind == "i"


def test_to_dataframe_of_an_empty_log_has_the_columns():
    df = ExitLog(COUNTERS).to_dataframe()
    assert len(df) == 0 and "kvm.exits" in df.columns and "reason" in df.columns


def test_listeners_see_every_new_record_until_unsubscribed():
    log = ExitLog()
    seen = []
    log.subscribe(seen.append)
    first, second = record(out()), record(Hlt())
    log.append(first)
    log.append(second)
    log.unsubscribe(seen.append)
    log.append(record(out()))
    log.unsubscribe(seen.append)  # twice is harmless
    assert seen == [first, second]
    assert seen[1].seq == 2


def test_clear_starts_over():
    log = ExitLog()
    log.append(record(out()))
    log.clear()
    assert len(log) == 0 and log.histogram() == {} and log.last is None
    log.append(record(Hlt()))
    assert log.last.seq == 1


# --- the rows: what a record reads back as, around the ring, beside the rows ---------------

def exits_of_every_shape():
    """One exit of each shape a log stores: whole in a row, or kept beside it."""
    return [IoOut(0xE9, 1, 1, b"x"), IoOut(0x3F8, 4, 1, b"\x01\x02\x03\x04"),
            IoIn(0x3FD, 1, 1, 4096), MmioRead(0xD000_0000, 4),
            MmioWrite(0xFEE0_00B0, 8, bytes(range(8))), Hlt(), Interrupted(),
            IoOut(0xE9, 1, 3, b"xyz"), IoIn(0x60, 2, 5, 4096),          # string I/O
            Debug(1, 0x8003, 0xFFFF4FF1, 0x400), OtherExit(ExitReason.HYPERCALL),
            InternalError(1, (2, 3), b"\x0f\x0b")]


def chained(exits, names=COUNTERS, *, vcpu=0, start=0):
    """Records of `exits` whose counters continue one another, as one vCPU's do."""
    counters = tuple(start + i for i in range(len(names)))
    records = []
    for i, exit in enumerate(exits):
        after = tuple(c + 1 for c in counters)
        records.append(ExitRecord(vcpu, exit, 0x8000 + i, f"dev{i % 3}" if i % 2 else None,
                                  bool(i % 2), 2.0 ** -(i + 10), counters, after))
        counters = after
    return records


def test_a_record_reads_back_as_it_was_appended():
    log = ExitLog(COUNTERS)
    records = chained(exits_of_every_shape())
    for r in records:
        log.append(r)
    assert list(log) == records == list(log.records)
    assert list(reversed(log.records)) == records[::-1]
    assert log.records[3] == records[3] and log.records[-2] == records[-2] == log.record(11)
    assert log.last == records[-1]
    assert log.histogram()["IO out"] == 3 and log.histogram()["DEBUG"] == 1


def test_the_ring_keeps_the_newest_and_what_lies_beside_them():
    log = ExitLog(COUNTERS, keep=5)
    records = chained(exits_of_every_shape() * 2)
    for r in records:
        log.append(r)
    assert list(log) == records[-5:] and len(log) == 24
    assert len(log._side) <= 5, "what lay beside overwritten rows is let go"
    with pytest.raises(IndexError):
        log.record(19)
    assert log.kernel_totals() == {name: 5 for name in COUNTERS}


def test_counters_a_row_cannot_hold_are_kept_exact():
    log = ExitLog(COUNTERS)
    steps = [(10, 20, 0), (11, 70_020, 0), (12, 70_021, 1), (0, 5, 1), (1, 6, 1)]  # reset: 0
    records = [ExitRecord(0, out(), 0x1000, None, False, 1e-6, before, after)
               for before, after in zip(steps, steps[1:])]
    for r in records:
        log.append(r)
    assert [(r.counters_before, r.counters_after) for r in log] == list(zip(steps, steps[1:]))
    assert [log.kernel_delta(r) for r in log] == [
        {"exits": 1, "insn_emulation": 70_000}, {"exits": 1, "insn_emulation": 1, "halt_exits": 1},
        {"exits": -12, "insn_emulation": -70_016}, {"exits": 1, "insn_emulation": 1}]
    assert log.kernel_totals() == {"exits": -9, "insn_emulation": -14, "halt_exits": 1}
    assert log.to_dataframe()["kvm.insn_emulation"].tolist() == [70_000, 1, -70_016, 1]


def test_each_vcpus_counters_read_back_when_interleaved_and_restarted():
    """Two vCPUs share a log; vCPU 0's counters then start again (a new vCPU fd)."""
    zero, one = chained([out()] * 4), chained([Hlt()] * 3, vcpu=1, start=500)
    again = chained([out()] * 2, start=7)
    records = [zero[0], one[0], zero[1], zero[2], one[1], zero[3], again[0], one[2], again[1]]
    log = ExitLog(COUNTERS)
    for r in records:
        log.append(r)
    assert list(log) == records


def test_without_counters_and_with_more_counters_than_a_row_holds():
    names = tuple(f"c{i}" for i in range(20))
    log = ExitLog(names)
    records = chained([out()] * 3, names)
    log.append(record(Hlt()))
    for r in records:
        log.append(r)
    assert list(log)[0].counters_after is None and list(log)[1:] == records
    assert log.kernel_totals() == dict.fromkeys(names, 3)


def test_a_row_is_64_bytes_and_the_rows_grow_to_keep():
    log = ExitLog(COUNTERS, keep=3000)
    for r in chained([out()] * 3000):
        log.append(r)
    assert len(log._rows) == 3000 * 64
    assert log.columns().itemsize == 64


def test_the_dataframe_reads_the_rows_in_place():
    import numpy as np
    log = ExitLog(COUNTERS)
    for r in chained([out(), Hlt()] * 10):
        log.append(r)
    df = log.to_dataframe()
    assert np.shares_memory(df["rip"].to_numpy(), np.frombuffer(log._rows, np.uint8))
    assert df["rip"].tolist() == [0x8000 + i for i in range(20)]
    assert df["seq"].tolist() == list(range(1, 21))


@pytest.mark.skipif(exitlog._runloop is None, reason="vlab.machine._runloop is not built here")
def test_compiled_and_python_appends_write_the_same_rows(monkeypatch):
    """ExitLog.append writes a row in C where it can: the same bytes as in Python."""
    records = chained(exits_of_every_shape() * 3) + [record(out(0x80))]
    compiled, python = ExitLog(COUNTERS, keep=20), ExitLog(COUNTERS, keep=20)
    for r in records:
        compiled.append(r)
    monkeypatch.setattr(exitlog, "_runloop", None)
    for r in records:
        python.append(r)
    assert compiled._rows == python._rows and compiled._counts == python._counts
    assert list(compiled) == list(python)
    assert list(python)[:-1] == records[-20:-1]   # the last one's 2e-6 s, read back as a float32


# --- indexed reads: from the nearest checkpoint, anywhere in the ring -------------------------

def two_vcpus(count: int, start: int = 0) -> list[ExitRecord]:
    """`count` records of two vCPUs interleaved unevenly, of every shape, with counter
    deltas a row cannot hold, vCPU 0's counters starting again now and then (a new fd),
    and records without counters."""
    shapes = exits_of_every_shape()
    counters = {0: (10, 20, 30), 1: (5_000, 6_000, 7_000)}
    records = []
    for i in range(start, start + count):
        vcpu = 1 if i % 7 in (2, 5) else 0
        exit = shapes[i % len(shapes)]
        if i % 97 == 0:
            records.append(ExitRecord(vcpu, exit, 0x9000 + i, None, False, 0.5, None, None))
            continue
        before = (i, 0, 1) if vcpu == 0 and i % 1000 == 999 else counters[vcpu]
        step = 70_000 if i % 333 == 0 else i % 5
        after = (before[0] + 1, before[1] + step, before[2] + (i % 2))
        counters[vcpu] = after
        records.append(ExitRecord(vcpu, exit, 0x8000 + i, f"dev{i % 3}" if i % 2 else None,
                                  bool(i % 2), 2.0 ** -(i % 20 + 10), before, after))
    return records


def test_indexed_reads_anywhere_in_the_ring_match_the_appended_records():
    keep = 3 * exitlog.CHECKPOINT + 100
    log = ExitLog(COUNTERS, keep=keep)
    appended = two_vcpus(2 * keep + 77)   # wrapped around twice
    for r in appended:
        log.append(r)
    kept = appended[-keep:]
    order = [0, keep - 1, keep // 2, 1, exitlog.CHECKPOINT - 1, exitlog.CHECKPOINT,
             exitlog.CHECKPOINT + 1, -1, -keep, 5, 2 * exitlog.CHECKPOINT + 3]
    for index in order + list(range(0, keep, 37)):
        assert log.records[index] == kept[index]
    assert log.first_seq == len(appended) - keep + 1 == kept[0].seq
    assert log.record(log.first_seq) == kept[0] and list(log) == kept
    # more appended: what was read before still reads right, and so do the new ones
    more = two_vcpus(keep // 3, start=len(appended))
    for r in more:
        log.append(r)
    kept = (appended + more)[-keep:]
    for index in order + list(range(3, keep, 41)):
        assert log.records[index] == kept[index]
    log.clear()
    again = two_vcpus(exitlog.CHECKPOINT + 10, start=500)
    for r in again:
        log.append(r)
    assert log.records[0].rip == again[0].rip and log.records[3].seq == 4
    assert [log.records[i].counters_after for i in range(len(again))] == \
        [r.counters_after for r in again]


def test_a_read_sums_back_from_the_checkpoint_after_it(monkeypatch):
    log = ExitLog(COUNTERS, keep=100_000)
    for r in chained([out(), Hlt()] * 5_000):
        log.append(r)
    rows = []
    row = log._row
    monkeypatch.setattr(log, "_row", lambda seq: rows.append(seq) or row(seq))
    assert log.records[-1].seq == 10_000 and len(rows) <= 2   # the newest: one row
    log.records[0]     # the first read walks back from the newest, keeping checkpoints
    for index in (0, 1, 4_321, 9_998, 5_000, 511, 512):
        rows.clear()
        assert log.records[index].seq == index + 1
        assert len(rows) <= exitlog.CHECKPOINT
