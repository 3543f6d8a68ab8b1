"""The traced run loop with KVM's tracepoints read after every KVM_RUN, against the same loop
without them: what `vlab.Lab(kernel_trace=True)` costs per exit, and what it loses.

    python benchmarks/bench_kernel_trace.py [--rounds N] [--exits N] [--spin N]

The guest of bench_runloop.py (a debug-console `out` in a loop, every exit dispatched,
recorded with KVM's counters) runs on a fresh board each round, untraced and traced in
alternating order. Traced, each exit also drains every CPU's ring buffer (trace_pipe_raw),
decodes the events and attaches the KVM_RUN's to its record. The ratio of the rates is the
cost; the ring buffers' overruns (`KernelTrace.lost`) are reported, never assumed zero.
A second guest then spins `--spin` times in one KVM_RUN before its `out`: where KVM emulates
kernel-mode code (kvm_pvm) each instruction is an event, and one KVM_RUN can overflow the
ring buffer however often it is read; the events kept and lost are printed for the kernel's
default buffer and a larger one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

from reference import LOAD_ADDR, Run, assemble, compare, interleave, print_table
from bench_runloop import DEBUGCON_LOOP, build_machine
from vlab.kvm import Hlt, KernelTrace, detect_backend, kernel_trace_usable

SPIN_LOOP = """\
bits 16
org {load:#x}
    mov ecx, {count}
.l: dec ecx
    jnz .l
    out 0xe9, al
    hlt
"""


def run_loop(guest: bytes, trace: KernelTrace | None, counted: list | None = None) -> Run:
    """One round on a fresh board: only `runner.run()` is timed; with `trace`, the kernel
    events the records got and the trace's lost count go to `counted`."""
    machine, runner = build_machine(guest)
    runner.kernel_trace = trace
    lost_before = trace.lost if trace is not None else 0
    try:
        result = runner.run()
        if not isinstance(result.last_exit, Hlt):
            raise RuntimeError(f"the guest stopped on {result.stop_reason}, not HLT")
        if counted is not None:
            counted.append((sum(len(r.kernel_events) for r in machine.log), trace.lost - lost_before))
        return Run(machine.log.histogram()["IO out"], result.seconds)
    finally:
        machine.close()
        machine.accel.close()


def spin(guest: bytes, buffer_size_kb: int | None) -> tuple[int, int, int]:
    """(events attached to the spinning KVM_RUN's record, events lost, buffer kB per CPU)."""
    with KernelTrace(buffer_size_kb=buffer_size_kb) as trace:
        size = int(open(f"{trace.path}/buffer_size_kb").read().split()[0])
        machine, runner = build_machine(guest)
        runner.kernel_trace = trace
        try:
            runner.run()
            first = next(iter(machine.log))
            return len(first.kernel_events), trace.lost, size
        finally:
            machine.close()
            machine.accel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exits", type=int, default=20_000)
    parser.add_argument("--spin", type=int, default=200_000)
    args = parser.parse_args()
    usable, why = kernel_trace_usable()
    if not usable:
        print(why, file=sys.stderr)
        return 2
    counted: list = []
    with tempfile.TemporaryDirectory() as tmp, KernelTrace() as trace:
        code = assemble(DEBUGCON_LOOP.format(load=LOAD_ADDR, count=args.exits), Path(tmp)).read_bytes()
        spinner = assemble(SPIN_LOOP.format(load=LOAD_ADDR, count=args.spin), Path(tmp), "spin").read_bytes()
        results = interleave({"untraced": partial(run_loop, code, None),
                              "kernel trace": partial(run_loop, code, trace, counted)},
                             args.rounds, expected_exits=args.exits)
    print(f"backend: {detect_backend().label}; {args.exits:,} debug-console exits per run, "
          f"{args.rounds} interleaved rounds (exits/s)")
    print_table(results, reference="untraced")
    c = compare(results, "kernel trace", "untraced")
    events = statistics.median(n for n, _ in counted) / args.exits
    lost = sum(lost for _, lost in counted)
    print(f"\nkernel trace: {c.median_rate:,.0f} exits/s against {c.reference_median_rate:,.0f} "
          f"untraced: ratio {c.ratio_of_medians:.2f} (median of per-round ratios "
          f"{c.median_of_ratios:.2f}); {events:.1f} kernel events per KVM_RUN; "
          f"events lost over all traced rounds: {lost}")
    for size in (None, 16384):
        kept, lost, kb = spin(spinner, size)
        print(f"one KVM_RUN spinning {args.spin:,} times, ring buffer {kb:,} kB per CPU: "
              f"{kept:,} events attached to its record, {lost:,} lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
