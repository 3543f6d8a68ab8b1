"""The exit log: histogram, kernel counter deltas, the keep limit, listeners, DataFrame export."""
from __future__ import annotations

import pandas as pd
import pytest

from vlab.kvm import ExitReason
from vlab.kvm.exits import Hlt, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, OtherExit
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
