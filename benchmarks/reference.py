"""What the run-loop benchmarks share: the guest, the C yardstick, interleaving and stats.

A Python run loop is judged against `exit_loop.c`, the same KVM_RUN loop written in C, on the
same guest and machine. The machine is shared and noisy, so contenders run in alternating
rounds (each round reverses the order, so neither always runs first) and are compared by
medians, never by a single run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
C_SOURCE = BENCH_DIR / "exit_loop.c"
LOAD_ADDR = 0x1000
MEM_SIZE = 0x100000  # exit_loop.c's MEM_SIZE: both loops give the guest the same 1 MiB

# The benchmarks run from a checkout, without installing vlab.
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

OUT_LOOP = """\
bits 16
org {load:#x}
    mov ecx, {count}
.l: out 0x80, al
    dec ecx
    jnz .l
    hlt
"""


@dataclass(frozen=True)
class Run:
    """One timed run of a loop: how many userspace exits it handled, in how long."""
    exits: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.exits / self.seconds


def exit_rate_arguments(description: str, target: float, rounds: int = 7,
                        exits: int = 100_000) -> argparse.Namespace:
    """The options every exits/s benchmark takes: rounds, exits per run, --check."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--exits", type=int, default=exits)
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the ratio is below {target}")
    return parser.parse_args()


def assemble(source: str, workdir: Path, name: str = "guest") -> Path:
    """A flat binary from nasm source (nasm, not a Python assembler: see the host notes)."""
    asm, binary = workdir / f"{name}.asm", workdir / f"{name}.bin"
    asm.write_text(source)
    subprocess.run(["nasm", "-f", "bin", "-o", str(binary), str(asm)], check=True)
    return binary


def out_loop_guest(count: int, workdir: Path, load: int = LOAD_ADDR) -> Path:
    """A real-mode guest making exactly `count` port-I/O exits (`out 0x80`), then HLT."""
    return assemble(OUT_LOOP.format(load=load, count=count), workdir, f"out_loop_{count}")


def build_c_reference() -> Path:
    """Compile exit_loop.c with -O2 into benchmarks/build/ (again only when it changed)."""
    binary = BUILD_DIR / "exit_loop"
    if not binary.exists() or binary.stat().st_mtime < C_SOURCE.stat().st_mtime:
        BUILD_DIR.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(C_SOURCE)], check=True)
    return binary


def run_c_reference(binary: Path, guest: Path, load: int = LOAD_ADDR) -> Run:
    """One run of the C loop; it fails (non-zero status) on any exit but port I/O and HLT."""
    done = subprocess.run([str(binary), str(guest), hex(load)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{binary.name} failed ({done.returncode}): {done.stderr.strip()}")
    match = re.fullmatch(r"exits=(\d+) seconds=([\d.]+)\s*", done.stdout)
    if not match:
        raise RuntimeError(f"{binary.name} printed {done.stdout!r}")
    return Run(int(match[1]), float(match[2]))


def interleave(contenders: dict[str, Callable[[], Run]], rounds: int,
               expected_exits: int | None = None) -> dict[str, list[Run]]:
    """Run every contender once per round, reversing the order each round; check each run
    handled `expected_exits`, so a faster loop cannot be one that skipped work."""
    results: dict[str, list[Run]] = {name: [] for name in contenders}
    order = list(contenders)
    for _ in range(rounds):
        for name in order:
            run = contenders[name]()
            if expected_exits is not None and run.exits != expected_exits:
                raise RuntimeError(f"{name} handled {run.exits} exits, expected {expected_exits}")
            results[name].append(run)
        order.reverse()
    return results


@dataclass(frozen=True)
class Comparison:
    """A contender against the reference: ratio of median rates, and median of the
    per-round ratios (less sensitive to load that drifts across rounds)."""
    median_rate: float
    reference_median_rate: float
    ratio_of_medians: float
    median_of_ratios: float

    def summary(self, target: float | None = None) -> str:
        """Both median rates and both ratios in a line (and the target, if any)."""
        return (f"{self.median_rate:,.0f} exits/s against {self.reference_median_rate:,.0f}: "
                f"ratio {self.ratio_of_medians:.2f} (median of per-round ratios "
                f"{self.median_of_ratios:.2f}{'' if target is None else f'; target >= {target}'})")


def compare(results: dict[str, list[Run]], name: str, reference: str) -> Comparison:
    rates = [run.rate for run in results[name]]
    reference_rates = [run.rate for run in results[reference]]
    median, reference_median = statistics.median(rates), statistics.median(reference_rates)
    return Comparison(median, reference_median, median / reference_median,
                      statistics.median(r / ref for r, ref in zip(rates, reference_rates)))


def print_table(results: dict[str, list[Run]], reference: str) -> None:
    """Per-round rates (exits/s) of every contender, with each one's ratio to `reference`;
    a median row; the median-of-ratios row."""
    others = [name for name in results if name != reference]
    header = ["round", *results, *(f"{name}/{reference}" for name in others)]
    widths = [max(len(h), 10) for h in header]

    def row(cells):
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))

    row(header)
    rounds = len(results[reference])
    for i in range(rounds):
        rates = {name: runs[i].rate for name, runs in results.items()}
        row([i + 1, *(f"{rates[n]:,.0f}" for n in results),
             *(f"{rates[n] / rates[reference]:.3f}" for n in others)])
    comparisons = {n: compare(results, n, reference) for n in others}
    medians = {n: statistics.median(run.rate for run in runs) for n, runs in results.items()}
    row(["median", *(f"{medians[n]:,.0f}" for n in results),
         *(f"{comparisons[n].ratio_of_medians:.3f}" for n in others)])
    row(["med ratio", *("" for _ in results),
         *(f"{comparisons[n].median_of_ratios:.3f}" for n in others)])
