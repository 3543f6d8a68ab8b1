"""Port-I/O exits per second of `vlab run --multiboot` against QEMU's `-accel kvm`, on the same kernel.

    python benchmarks/bench_qemu.py [--rounds N] [--exits N] [--check]

Both run the same multiboot kernel (built here with nasm from the test kernels' defs.inc and
lib.inc): it reads the TSC, makes N `out 0x80` exits, reads the TSC again, prints the
difference on COM1 and leaves through isa-debug-exit with status 1. The guest's own clock
times the loop, so start-up, QEMU's firmware and loading (which vary by seconds from run to
run on a shared host) stay out of the figure, and both VMMs are timed by the same clock at
the same two instructions. The ratio is vlab's exits/s over QEMU's; contenders run in
alternating rounds; medians of rounds. Each command's whole run (what a user waits, start-up
included) is shown beside it.

QEMU's command line is lesson 10's (`pit=off`: SeaBIOS would leave the PIT ticking into
the kernel). Where qemu-system-x86_64 is missing, the benchmark installs Debian's
`qemu-system-x86` with apt-get, and says so; where it cannot (not root, no apt-get, the
install failed) it says why and times vlab alone. `--check` exits with status 1 when
vlab's exit rate is below TARGET times QEMU's.
"""
from __future__ import annotations

import os
import re
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
BLOCKS = 20        # timed blocks per run: the fastest is the one the host disturbed least

KERNEL = """\
; {blocks} blocks of {per_block} port-I/O exits (`out 0x80`, a port neither QEMU's pc nor
; vlab's board emulates in the kernel), each between two reads of the TSC; after each block
; the cycles it took on COM1; then isa-debug-exit.
%include "defs.inc"
FLAT_KERNEL 0x100000

start:
    KERNEL_ENTRY bss_end
    mov ebx, {blocks}
.block:
    rdtsc
    mov esi, eax
    mov edi, edx
    mov ecx, {per_block}
.l: out 0x80, al
    dec ecx
    jnz .l
    rdtsc
    sub eax, esi
    sbb edx, edi
    mov esi, tsc_label
    call puts
    xchg eax, edx
    call puthex
    xchg eax, edx
    call puthex
    mov al, 10
    call putc
    dec ebx
    jnz .block
    mov eax, EXIT_PASS
    jmp exit
tsc_label: db "block-tsc=", 0

%include "lib.inc"
load_end:
bss_end equ load_end + 4096
"""


def build_kernel(blocks: int, per_block: int, workdir: Path) -> Path:
    source, image = workdir / f"out_{blocks}x{per_block}.asm", workdir / f"out_{blocks}x{per_block}.bin"
    source.write_text(KERNEL.format(blocks=blocks, per_block=per_block))
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


def tsc_hz() -> float:
    """The guest TSC's rate: KVM_GET_TSC_KHZ of a scratch vCPU (neither VMM sets another)."""
    from vlab.kvm import Kvm
    with Kvm() as kvm:
        return kvm.create_vm().create_vcpu(0).get_tsc_khz() * 1e3


def timed(argv: list[str], blocks: int, per_block: int, hz: float, whole: list[float],
          best: list[Run]) -> Run:
    """All the kernel's blocks as its TSC timed them; the fastest block goes to `best`, the
    command's wall time to `whole`. The command's exit status must be the kernel's EXIT_STATUS."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=600)
    whole.append(time.perf_counter() - start)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode != EXIT_STATUS:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}, expected {EXIT_STATUS}:"
                           f"\n{output}")
    cycles = [int(found, 16) for found in re.findall(r"block-tsc=([0-9a-f]{16})", output)]
    if len(cycles) != blocks:
        raise RuntimeError(f"{' '.join(argv)} printed {len(cycles)} block-tsc= lines, "
                           f"expected {blocks}:\n{output}")
    best.append(Run(per_block, min(cycles) / hz))
    return Run(blocks * per_block, sum(cycles) / hz)


def vlab_command(kernel: Path) -> list[str]:
    return [sys.executable, "-m", "vlab", "run", "--accel", "kvm", "--multiboot", str(kernel)]


def qemu_command(qemu: str):
    def command(kernel: Path) -> list[str]:
        return [qemu, "-accel", "kvm", "-machine", "pc,pit=off", "-m", "64M",
                "-kernel", str(kernel), "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]
    return command


def main() -> int:
    args = exit_rate_arguments(__doc__.splitlines()[0], TARGET, rounds=7, exits=200_000)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("no usable /dev/kvm: both contenders need KVM")
        return 0
    os.environ["PYTHONPATH"] = str(REPO)   # the benchmarks run from a checkout
    qemu = ensure_qemu()
    hz = tsc_hz()
    per_block = max(args.exits // BLOCKS, 1)
    whole: dict[str, list[float]] = {"vlab": [], "qemu": []}
    best: dict[str, list[Run]] = {"vlab": [], "qemu": []}
    commands = {"vlab": vlab_command, **({"qemu": qemu_command(qemu)} if qemu else {})}
    with tempfile.TemporaryDirectory() as tmp:
        kernel = build_kernel(BLOCKS, per_block, Path(tmp))
        contenders = {name: (lambda name=name, command=command: timed(
                          command(kernel), BLOCKS, per_block, hz, whole[name], best[name]))
                      for name, command in commands.items()}
        results = interleave(contenders, args.rounds, expected_exits=BLOCKS * per_block)
    print(f"{BLOCKS} blocks of {per_block:,} port-I/O exits per run, each block timed by the "
          f"guest's TSC ({hz / 1e9:.3f} GHz); {args.rounds} interleaved rounds")
    for name, seconds in whole.items():
        if seconds:
            print(f"  {name}: whole command {statistics.median(seconds):.2f} s median "
                  f"(start-up{', firmware' if name == 'qemu' else ''} and the blocks)")
    if not qemu:
        for label, runs in (("all blocks", results["vlab"]), ("fastest block", best["vlab"])):
            rate = statistics.median(run.rate for run in runs)
            print(f"vlab run --multiboot, {label}: median {rate:,.0f} exits/s "
                  f"({1e6 / rate:.2f} µs per exit)")
        return 0
    for label, table in (("all blocks", results), ("fastest block of each run", best)):
        print(f"{label} (exits/s):")
        print_table(table, reference="qemu")
        print("  " + ", ".join(f"{name} {1e6 / statistics.median(run.rate for run in runs):.2f} µs"
                               for name, runs in table.items()) + " per exit")
    for label, table in (("all blocks", results), ("fastest block", best)):
        print(f"vlab run --multiboot against QEMU -accel kvm, {label}: "
              f"{compare(table, 'vlab', 'qemu').summary(TARGET)}")
    fastest = compare(best, "vlab", "qemu")
    return 1 if args.check and fastest.ratio_of_medians < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
