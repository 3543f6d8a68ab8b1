"""Port-I/O exits per second of `vlab run --multiboot` against QEMU's `-accel kvm`, on the same kernel.

    python benchmarks/bench_qemu.py [--rounds N] [--exits N] [--check]

Both run the same multiboot kernel (built here with nasm from the test kernels' defs.inc and
lib.inc): `out 0x80, al` N times, then isa-debug-exit with status 1. Each command's whole
run is timed, start-up and QEMU's firmware included, for a 1-iteration and an N-iteration
kernel; the difference is what the extra N-1 exits cost (the slope method), so start-up,
SeaBIOS and loading cancel out. The ratio is vlab's exits/s over QEMU's. Contenders run in
alternating rounds; medians of rounds. Wall time is what a user waits; the processes' CPU
time (user and system, the guest's included) is shown beside it, being steadier on a shared
host, where QEMU's firmware alone varies by seconds from run to run.

QEMU's command line is lesson 10's (`pit=off`: SeaBIOS would leave the PIT ticking into
the kernel). Where qemu-system-x86_64 is missing, the benchmark installs Debian's
`qemu-system-x86` with apt-get, and says so; where it cannot (not root, no apt-get, the
install failed) it says why and times vlab alone. `--check` exits with status 1 when
vlab's exit rate (wall time) is below TARGET times QEMU's.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reference import Run, compare, exit_rate_arguments, interleave, print_table

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "tests" / "kvm" / "kernels"
QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
TARGET = 1.0      # vlab at least as fast per exit as QEMU (issue 16)
EXIT_STATUS = 1   # isa-debug-exit with EXIT_PASS: (0 << 1) | 1, for both

KERNEL = """\
; {count} port-I/O exits (`out 0x80`, a port neither QEMU's pc nor vlab's board emulates in
; the kernel), then isa-debug-exit.
%include "defs.inc"
FLAT_KERNEL 0x100000

start:
    KERNEL_ENTRY bss_end
    mov ecx, {count}
.l: out 0x80, al
    dec ecx
    jnz .l
    mov eax, EXIT_PASS
    jmp exit

%include "lib.inc"
load_end:
bss_end equ load_end + 4096
"""


def build_kernel(count: int, workdir: Path) -> Path:
    source, image = workdir / f"out_{count}.asm", workdir / f"out_{count}.bin"
    source.write_text(KERNEL.format(count=count))
    subprocess.run(["nasm", "-f", "bin", f"-I{KERNELS}/", str(source), "-o", str(image)],
                   check=True)
    return image


def ensure_qemu() -> str | None:
    """The path of qemu-system-x86_64, installed with apt-get if needed; None, having said
    why, when it is missing and cannot be installed."""
    found = shutil.which(QEMU)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"{QEMU} is not installed and this benchmark cannot install it "
              f"({'not root' if os.geteuid() else 'no apt-get'}): "
              f"install Debian's {QEMU_PACKAGE} to compare; timing vlab alone")
        return None
    print(f"{QEMU} is not installed: apt-get install -y {QEMU_PACKAGE}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", QEMU_PACKAGE],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"apt-get could not install {QEMU_PACKAGE} (status {done.returncode}): "
              f"{done.stderr.strip().splitlines()[-1:]}; timing vlab alone")
        return None
    return shutil.which(QEMU)


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of `argv`, whose exit status must be the kernel's EXIT_STATUS."""
    cpu, start = _cpu_of_children(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=600)
    seconds, cpu = time.perf_counter() - start, _cpu_of_children() - cpu
    if done.returncode != EXIT_STATUS:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}, expected {EXIT_STATUS}:"
                           f"\n{done.stdout.decode()}{done.stderr.decode()}")
    return seconds, cpu


def slope(command, one: Path, many: Path, exits: int, cpu_runs: list[Run]) -> Run:
    """The N-1 extra exits of the N-iteration kernel and the extra wall time they took; the
    extra CPU time goes to `cpu_runs`."""
    (wall_1, cpu_1), (wall_n, cpu_n) = timed(command(one)), timed(command(many))
    cpu_runs.append(Run(exits - 1, cpu_n - cpu_1))
    return Run(exits - 1, wall_n - wall_1)


def vlab_command(kernel: Path) -> list[str]:
    return [sys.executable, "-m", "vlab", "run", "--accel", "kvm", "--multiboot", str(kernel)]


def qemu_command(qemu: str):
    def command(kernel: Path) -> list[str]:
        return [qemu, "-accel", "kvm", "-machine", "pc,pit=off", "-m", "64M",
                "-kernel", str(kernel), "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot"]
    return command


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET, rounds=5, exits=200_000)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("no usable /dev/kvm: both contenders need KVM")
        return 0
    os.environ["PYTHONPATH"] = str(REPO)   # the benchmarks run from a checkout
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = build_kernel(1, Path(tmp)), build_kernel(args.exits, Path(tmp))
        cpu = {"vlab": [], "qemu": []}
        contenders = {"vlab": lambda: slope(vlab_command, one, many, args.exits, cpu["vlab"])}
        if qemu:
            contenders["qemu"] = lambda: slope(qemu_command(qemu), one, many, args.exits,
                                               cpu["qemu"])
        results = interleave(contenders, args.rounds, expected_exits=args.exits - 1)
    print(f"{args.exits - 1:,} extra port-I/O exits (kernels of 1 and {args.exits:,} "
          f"iterations), {args.rounds} interleaved rounds (exits/s from the slope)")
    if not qemu:
        for clock, runs in (("wall", results["vlab"]), ("CPU", cpu["vlab"])):
            rate = statistics.median(run.rate for run in runs)
            print(f"vlab run --multiboot: median {rate:,.0f} exits/s of {clock} time")
        return 0
    for clock, table in (("wall", results), ("CPU", cpu)):
        print(f"{clock} time:")
        print_table(table, reference="qemu")
    for clock, table in (("wall", results), ("CPU", cpu)):
        print(f"vlab run --multiboot against QEMU -accel kvm, {clock} time: "
              f"{compare(table, 'vlab', 'qemu').summary(TARGET)}")
    wall = compare(results, "vlab", "qemu")
    return 1 if args.check and wall.ratio_of_medians < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
