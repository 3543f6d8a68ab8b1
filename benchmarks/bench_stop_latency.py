"""How long a run takes to return once told to stop: Ctrl-C (SIGINT to the process),
`lab.stop()` from another thread, and `timeout=` (how far past the timeout it returns).

    python benchmarks/bench_stop_latency.py [--rounds N] [--accel kvm|tcg ...]

The guest spins (`jmp $`) and never exits by itself, so every stop has to kick the vCPU
out of KVM_RUN (a signal) or out of Unicorn (`uc_emu_stop`). Each way is measured with one
vCPU and with two (their own threads, `run_vcpus`); the table gives the median and the
maximum over the rounds, in milliseconds, from the stop to `run()` returning.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import threading
import time

from vlab import Lab
from vlab.kvm import kvm_usable

SPIN = "spin: jmp spin"
TIMEOUT = 0.05


def _lab(accel: str, vcpus: int) -> Lab:
    lab = Lab(accel=accel, vcpus=vcpus)
    lab.load_assembly(SPIN)
    lab.bring_up()
    lab.run(timeout=TIMEOUT)   # kvm_cpu_exec: the first run, recorded, not measured
    return lab


def _stopped_by(lab: Lab, stop) -> float:
    """Seconds from `stop()` (called from another thread after a random delay, while the
    guest spins) to run() returning."""
    told = []

    def later():
        time.sleep(random.uniform(0.02, 0.05))
        told.append(time.perf_counter())
        stop()

    thread = threading.Thread(target=later)
    thread.start()
    lab.run()
    returned = time.perf_counter()
    thread.join()
    return returned - told[0]


def sigint(lab: Lab) -> float:
    return _stopped_by(lab, lambda: os.kill(os.getpid(), signal.SIGINT))


def lab_stop(lab: Lab) -> float:
    return _stopped_by(lab, lab.stop)


def timeout(lab: Lab) -> float:
    started = time.perf_counter()
    lab.run(timeout=TIMEOUT)
    return time.perf_counter() - started - TIMEOUT


WAYS = {"SIGINT": sigint, "lab.stop()": lab_stop, f"timeout={TIMEOUT}": timeout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--accel", action="append", choices=["kvm", "tcg"])
    args = parser.parse_args()
    accels = args.accel or (["kvm", "tcg"] if kvm_usable()[0] else ["tcg"])
    print(f"{'accel':<6} {'vCPUs':>5}  {'stopped by':<14} {'median ms':>10} {'max ms':>8}")
    for accel in accels:
        for vcpus in (1, 2):
            with _lab(accel, vcpus) as lab:
                for name, way in WAYS.items():
                    times = [way(lab) * 1e3 for _ in range(args.rounds)]
                    print(f"{accel:<6} {vcpus:>5}  {name:<14} {statistics.median(times):>10.3f} "
                          f"{max(times):>8.3f}")


if __name__ == "__main__":
    main()
