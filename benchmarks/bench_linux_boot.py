"""Time from start to Linux's /init: vlab's PC against QEMU `-accel kvm -kernel -initrd
-append`, the same Debian bzImage and busybox initramfs, on the same host.

    python benchmarks/bench_linux_boot.py [--rounds N] [--append TEXT] [--record FILE]

Needs a KVM that runs guest kernel code natively (VMX or SVM; here: the SVM test host,
`tools/svm-host/svm_host.py --python benchmarks/bench_linux_boot.py`): on kvm_pvm Linux
stops in KVM's emulator under any VMM. Each round boots, in alternating order:

- vlab: `boot_linux` on `create_linux_pc`, in this process; timed from the call (VM,
  irqchip, loading) and from the first KVM_RUN, to the moment /init's marker line reaches
  the serial console, and to the run's end (`poweroff -f`: ACPI S5);
- QEMU: `qemu-system-x86_64 -accel kvm -cpu host -m 256M -kernel -initrd -append`, timed
  from the spawn (its SeaBIOS and linuxboot option ROM included: that is QEMU's `-kernel`)
  to the marker on its serial output, and to its exit.

The ratio is vlab's median time to /init over QEMU's. `--record FILE` also boots once with
KVM's tracepoints (vlab.kvm.KernelTrace; `quiet` added, see `record`) and writes what
lesson 12 shows as JSON: the kernel, the command line, the medians, the exits of the last
boot by kind and by device, KVM's counters, the kernel's table of exits inside KVM_RUN;
`-` prints it between two marker lines (the SVM host's root is read-only: the run's output
carries it out).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks run from a checkout, without installing vlab
from vlab.kvm import detect_backend  # noqa: E402
from vlab.machine.debian_kernel import linux_kernel  # noqa: E402
from vlab.machine.initramfs import MARKER, build_initramfs  # noqa: E402
from vlab.machine.linux import load_linux  # noqa: E402
from vlab.machine.pc import boot_pc, create_linux_pc  # noqa: E402

QEMU = "qemu-system-x86_64"
MEMORY = "256M"
APPEND = "console=ttyS0 panic=-1"
TIMEOUT = 600
TRACED_TIMEOUT = 900
RECORD_BEGIN, RECORD_END = "--- linux boot record (JSON) ---", "--- end of record ---"


class MarkerWatch:
    """Console bytes as they come; the time the marker line first shows."""

    def __init__(self):
        self.buffer = bytearray()
        self.seen: float | None = None

    def __call__(self, data: bytes) -> None:
        if self.seen is None:
            self.buffer += data
            if MARKER.encode() in self.buffer:
                self.seen = time.perf_counter()


def exits_by_device(machine) -> dict[str, int]:
    """The machine's userspace exits (those its log keeps: the last 100,000) by the device
    that took them; an unclaimed port or address by its number."""
    log = machine.log
    names = {log.device_number(name): name for name in machine.devices}
    counts: dict[str, int] = {}
    for row in log.columns():
        name = names.get(int(row["device"])) or f"unclaimed {int(row['address']):#x}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def boot_vlab(kernel: Path, initrd: Path, append: str, kernel_trace=None,
              timeout: float = TIMEOUT) -> dict:
    watch = MarkerWatch()
    loaded = {}
    machines = []

    def create(accel, **options):
        machines.append(create_linux_pc(accel, **options))
        return machines[-1]

    def load(machine):
        boot = load_linux(machine, kernel, initrd, append)
        loaded["at"] = time.perf_counter()      # the next thing is the first KVM_RUN
        return boot

    started = time.perf_counter()
    result = boot_pc(load, create=create, memory=MEMORY, timeout=timeout,
                     output=watch, kernel_trace=kernel_trace)
    ended = time.perf_counter()
    if watch.seen is None and kernel_trace is None:
        raise SystemExit(f"vlab: no marker on the console\n{result.summary()}\n"
                         f"{result.console[-3000:]}")
    seen = ended if watch.seen is None else watch.seen     # a traced boot cut short: its end
    return {"to_init_s": seen - started, "kvm_run_to_init_s": seen - loaded["at"],
            "total_s": ended - started, "result": result, "machine": machines[0]}


def boot_qemu(qemu: str, kernel: Path, initrd: Path, append: str) -> dict:
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-m", MEMORY, "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", append]
    watch = MarkerWatch()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            watch(chunk)
        proc.wait()
    finally:
        timer.cancel()
    ended = time.perf_counter()
    if watch.seen is None:
        raise SystemExit(f"QEMU: no marker (status {proc.returncode})\n"
                         f"{watch.buffer[-3000:].decode(errors='replace')}")
    return {"to_init_s": watch.seen - started, "total_s": ended - started}


def record(kernel: Path, initrd: Path, append: str, rounds: dict) -> dict:
    """What lesson 12 shows of a boot on this host: the medians, the exits of the last
    untraced boot, and the kernel's table of exits from one boot with KVM's tracepoints.
    That boot adds `quiet`: reading the trace after each of a full boot log's ~80,000
    userspace exits takes longer than the boot (TRACED_TIMEOUT bounds it)."""
    from vlab.kvm import KernelTrace
    trace = KernelTrace()
    traced_append = f"{append} quiet"
    try:
        traced = boot_vlab(kernel, initrd, traced_append, kernel_trace=trace,
                           timeout=TRACED_TIMEOUT)
    finally:
        trace.close()
    table = traced["result"].vcpus[0].kernel_exits
    last = rounds["vlab"][-1]
    report = last["result"].vcpus[0]
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]
                     if key not in ("result", "machine")} for name, runs in rounds.items()}
    return {
        "backend": detect_backend().label,
        "kernel": kernel.parent.name if kernel.name == "vmlinuz" else kernel.name,
        "append": append, "memory": MEMORY, "rounds": len(rounds["vlab"]),
        "median": median,
        "ratio_to_init": median["vlab"]["to_init_s"] / median["qemu"]["to_init_s"]
        if "qemu" in median else None,
        "boot": {"ended_by": last["result"].ended_by, "stop_reason": last["result"].stop_reason,
                 "exits": report.exits, "histogram": report.histogram,
                 "by_device": exits_by_device(last["machine"]), "in_kernel": report.kernel,
                 "console_chars": len(last["result"].console)},
        "traced": {"append": traced_append, "ended_by": traced["result"].ended_by,
                   "reached_init": MARKER in traced["result"].console,
                   "kvm_run_to_init_s": traced["kvm_run_to_init_s"],
                   "exits": traced["result"].vcpus[0].exits,
                   "runs": table.runs, "emulated": table.emulated,
                   "rows": [[row.reason, row.in_kernel, row.userspace] for row in table.rows]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append", default=APPEND)
    parser.add_argument("--record", help="write lesson 12's JSON here ('-': print it)")
    args = parser.parse_args()
    backend = detect_backend()
    if backend.emulates_kernel_mode:
        print(f"{backend.label}: KVM emulates guest kernel code here, so Linux cannot boot "
              "(run this on VMX or SVM, e.g. the SVM test host)")
        return 2
    kernel = linux_kernel()
    initrd = build_initramfs("check")
    qemu = shutil.which(QEMU)
    print(f"{platform.node()}: KVM backend {backend.label}; kernel {kernel}; initrd {initrd}; "
          f"-append {args.append!r}")
    if qemu is None:
        print(f"{QEMU} not found: timing vlab alone")
    runs: dict[str, list[dict]] = {"vlab": []}
    if qemu:
        runs["qemu"] = []
    for n in range(args.rounds):
        order = ["vlab", "qemu"] if n % 2 == 0 else ["qemu", "vlab"]
        for name in order:
            if name == "vlab":
                runs["vlab"].append(boot_vlab(kernel, initrd, args.append))
            elif qemu:
                runs["qemu"].append(boot_qemu(qemu, kernel, initrd, args.append))
        print(f"round {n + 1}: " + ", ".join(
            f"{name} {r[-1]['to_init_s']:.2f} s to /init, {r[-1]['total_s']:.2f} s in all"
            for name, r in runs.items()), flush=True)
    vlab = statistics.median(r["to_init_s"] for r in runs["vlab"])
    line = (f"median time to /init: vlab {vlab:.2f} s (from the first KVM_RUN "
            f"{statistics.median(r['kvm_run_to_init_s'] for r in runs['vlab']):.2f} s)")
    if qemu:
        other = statistics.median(r["to_init_s"] for r in runs["qemu"])
        line += f", QEMU {other:.2f} s: ratio vlab/QEMU {vlab / other:.2f}"
    print(line)
    if args.record:
        data = json.dumps(record(kernel, initrd, args.append, runs), indent=1)
        if args.record == "-":
            print(RECORD_BEGIN, data, RECORD_END, sep="\n")
        else:
            Path(args.record).write_text(data + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
