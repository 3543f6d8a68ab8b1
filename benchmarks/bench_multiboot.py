"""Wall time from `vlab run --multiboot` to exit for a trivial kernel, beside what Python's
own start-up costs.

    python benchmarks/bench_multiboot.py [--rounds N] [--check]

The kernel is tests/kvm/kernels/trivial.asm: a flat binary with the a.out-kludge header that
prints one line over COM1 and writes isa-debug-exit (status 1). Each round times, as
subprocesses and in alternating order:

- `python -m vlab run --multiboot trivial.bin`: the whole command, interpreter start-up,
  imports, VM, irqchip, PIT, vCPU thread and the guest's run; it must exit with status 1;
- `python -c "import vlab.cli"`: interpreter start-up and the command's imports, the floor
  under the first figure;
- QEMU booting the same kernel with `-accel kvm -kernel`, when qemu-system-x86_64 is
  installed (its firmware alone takes seconds).

It also times `boot_multiboot` in this process, the part of the first figure that is not
start-up. Medians of wall and CPU time are printed (on a shared host the wall time follows
the load; the CPU time hardly does); `--check` exits with status 1 when the command's
median wall time is above TARGET.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_SOURCE = REPO / "tests" / "kvm" / "kernels" / "trivial.asm"
TARGET = 0.5  # seconds, from the command's start to its exit
QEMU = "qemu-system-x86_64"

sys.path.insert(0, str(REPO))  # the benchmarks run from a checkout, without installing vlab
from vlab.machine.pc import boot_multiboot  # noqa: E402


def build_kernel(workdir: Path) -> Path:
    image = workdir / "trivial.bin"
    subprocess.run(["nasm", "-f", "bin", f"-I{KERNEL_SOURCE.parent}/", str(KERNEL_SOURCE),
                    "-o", str(image)], check=True)
    return image


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], expect: int) -> tuple[float, float]:
    """Wall and CPU seconds from spawning `argv` to its exit, which must be `expect`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cpu, start = _cpu_of_children(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    seconds, cpu = time.perf_counter() - start, _cpu_of_children() - cpu
    if done.returncode != expect:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}, expected {expect}:\n"
                           f"{done.stdout.decode()}{done.stderr.decode()}")
    return seconds, cpu


def in_process(kernel: Path) -> tuple[float, float]:
    cpu, start = time.process_time(), time.perf_counter()
    result = boot_multiboot(kernel, accel="kvm", timeout=30)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if result.status != 1:
        raise RuntimeError(f"boot_multiboot: {result.summary()}")
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when `vlab run --multiboot` takes more than {TARGET} s")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        kernel = build_kernel(Path(tmp))
        contenders = {
            "vlab run --multiboot": lambda: timed(
                [sys.executable, "-m", "vlab", "run", "--multiboot", str(kernel),
                 "--accel", "kvm"], expect=1),
            "python -c 'import vlab.cli'": lambda: timed(
                [sys.executable, "-c", "import vlab.cli"], expect=0),
            "boot_multiboot (in-process)": lambda: in_process(kernel),
        }
        qemu = shutil.which(QEMU)
        if qemu:
            contenders["qemu -accel kvm -kernel"] = lambda: timed(
                [qemu, "-accel", "kvm", "-M", "pc", "-m", "128M", "-kernel", str(kernel),
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
                 "-display", "none", "-no-reboot"], expect=1)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        order = list(contenders)
        for _ in range(args.rounds):
            for name in order:
                runs[name].append(contenders[name]())
            order.reverse()

    width = max(map(len, runs))
    print(f"seconds over {args.rounds} rounds; CPU is user + system time, which the load "
          f"of other processes (load average {os.getloadavg()[0]:.1f}) does not inflate")
    print(f"{'':<{width}}  {'wall median':>11}  {'min':>6}  {'max':>6}  {'CPU median':>10}")
    for name, values in runs.items():
        wall = [w for w, _ in values]
        print(f"{name:<{width}}  {statistics.median(wall):11.3f}  {min(wall):6.3f}  "
              f"{max(wall):6.3f}  {statistics.median(c for _, c in values):10.3f}")
    if not qemu:
        print(f"{QEMU} is not installed: QEMU's figure is not measured here")
    median = statistics.median(w for w, _ in runs["vlab run --multiboot"])
    verdict = "within" if median <= TARGET else "ABOVE"
    print(f"`vlab run --multiboot` median {median:.3f} s: {verdict} the {TARGET} s target")
    return 1 if args.check and median > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
