"""Memory of the exit log: what a million kept records take.

    python benchmarks/bench_exitlog_memory.py [--records N] [--check]

A KVM guest makes N exits (an `out` to port 0x80, which no device claims, so nothing but the
log grows) through the traced run loop, into an ExitLog that keeps all N; tracemalloc says
what the run allocated and still holds. Without /dev/kvm the same number of records is
appended through `ExitLog.append`. For scale: the same records as Python objects, as a deque
of records held them before the log kept rows (an ExitRecord and its exit each, one counter
tuple each, shared as one record's after and the next one's before), measured on a tenth. Target: 1,000,000 records in at most 64 MiB.
`--check` exits with status 1 above it.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import tracemalloc
from pathlib import Path

from reference import LOAD_ADDR, OUT_LOOP, assemble
from bench_runloop import build_machine
from vlab.kvm import Hlt, IoOut, kvm_usable
from vlab.machine import runloop
from vlab.machine.exitlog import ExitLog, ExitRecord

MiB = 1 << 20
TARGET = 64 * MiB


def fill_from_kvm(records: int) -> tuple[ExitLog, int]:
    """The log of a guest's `records` exits (the last is its HLT), and the bytes the run
    left allocated."""
    with tempfile.TemporaryDirectory() as tmp:
        code = assemble(OUT_LOOP.format(load=LOAD_ADDR, count=records - 1), Path(tmp)).read_bytes()
    machine, runner = build_machine(code, keep=records)
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        result = runner.run()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        return machine.log, held
    finally:
        machine.close()
        machine.accel.close()


def fill_by_append(records: int) -> tuple[ExitLog, int]:
    """The same through ExitLog.append, with counters that move as KVM's do."""
    names = ("exits", "io_exits", "insn_emulation", "halt_exits")
    log = ExitLog(names, keep=records)
    counters = [0] * len(names)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(records):
        previous = tuple(counters)
        counters[0] += 1
        counters[2] += 1024
        log.append(ExitRecord(0, IoOut(0x80, 1, 1, bytes((i & 0xFF,))), 0x1003, None, False,
                              8e-6, previous, tuple(counters)))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return log, held


def as_objects(log: ExitLog, sample: int) -> int:
    """Bytes per record held as Python objects, from `sample` of the log's newest records
    (read back, one record's counters after are the next one's before: one tuple)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = list(itertools.islice(reversed(log.records), sample))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del kept
    return held // sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--check", action="store_true", help="exit 1 above 64 MiB per million")
    args = parser.parse_args()
    usable = kvm_usable()[0]
    loop = "compiled" if runloop._runloop is not None else "Python"
    how = (f"a KVM guest's exits through VcpuRunner.run() (the {loop} loop)" if usable
           else "ExitLog.append (no usable /dev/kvm here)")
    log, held = (fill_from_kvm if usable else fill_by_append)(args.records)
    assert len(log.records) == args.records == log.total
    per_million = held * 1_000_000 / args.records
    objects = as_objects(log, max(1, args.records // 10))
    print(f"{args.records:,} records kept, from {how}")
    print(f"  the log: {held / MiB:.1f} MiB held ({held / args.records:.1f} bytes per record; "
          f"{per_million / MiB:.1f} MiB per million; target <= {TARGET / MiB:.0f} MiB)")
    print(f"  as Python objects (ExitRecord, exit, counter tuples): {objects} bytes per record, "
          f"{objects * 1_000_000 / MiB:.0f} MiB per million")
    return 1 if args.check and per_million > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
