"""Latency of `VcpuRunner.step()`: one instruction under KVM_SET_GUEST_DEBUG single-step, a
register snapshot before and after (KVM_GET_REGS, KVM_GET_SREGS) and their diff.

    python benchmarks/bench_step.py [--steps N] [--check]

The guest is a three-instruction loop, so every step is an ordinary instruction. A
breakdown times the parts of a step on their own. `--check` exits with status 1 when the
median is above the target.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlab.accel import select  # noqa: E402
from vlab.machine.assembler import assemble  # noqa: E402
from vlab.machine.boot import create_machine  # noqa: E402
from vlab.machine.snapshot import RegisterSnapshot  # noqa: E402

TARGET_MEDIAN_MS = 1.0
ORG = 0x8000
LOOP = """
again:
    inc ax
    add bx, ax
    jmp again
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(fn, n: int = 500) -> float:
    """Median milliseconds per call of `fn` over `n` calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if the median is above {TARGET_MEDIAN_MS} ms")
    args = parser.parse_args()

    accel = select("kvm")
    machine, runner = create_machine(accel, memory="1M")
    try:
        machine.memory.write(ORG, assemble(LOOP, bits=16, org=ORG).code)
        machine.setup_cpu(runner.vcpu, "real", ORG)
        latencies = []
        for _ in range(args.steps):
            start = time.perf_counter()
            result = runner.step()
            latencies.append(time.perf_counter() - start)
        if not {"rip", "rax"} & set(result.changed):
            raise RuntimeError(f"the last step changed nothing expected: {result}")
        vcpu = runner.vcpu
        before, after = RegisterSnapshot.capture(vcpu), RegisterSnapshot.capture(vcpu)
        parts = {
            "register snapshot (GET_REGS + GET_SREGS)": timed(lambda: RegisterSnapshot.capture(vcpu)),
            "diff of two snapshots": timed(lambda: before.diff(after)),
            "KVM_SET_GUEST_DEBUG": timed(lambda: vcpu.set_guest_debug(enable=False)),
        }
    finally:
        machine.close()
        accel.close()

    ms = [t * 1e3 for t in latencies]
    median, p90 = statistics.median(ms), percentile(ms, 0.9)
    print(f"step() over {args.steps} instructions of a real-mode loop on kvm:")
    print(f"  median {median:.3f} ms, p90 {p90:.3f} ms, "
          f"min {min(ms):.3f} ms, max {max(ms):.3f} ms (target: median <= {TARGET_MEDIAN_MS} ms)")
    print("  parts (median ms per call): a step takes 2 snapshots, 2 KVM_SET_GUEST_DEBUG, "
          "1 KVM_RUN and 1 diff")
    for name, value in parts.items():
        print(f"    {name:<44} {value:.3f}")
    return 1 if args.check and median > TARGET_MEDIAN_MS else 0


if __name__ == "__main__":
    sys.exit(main())
