"""The `vlab` command.

`vlab doctor` says whether this machine can run the lab and what to do when something is
missing; `vlab caps` lists every KVM capability with its value. Each subcommand is one
function registered with `@command`; `main` builds the argparse parser from that table.

The KVM device is /dev/kvm, or the path in $VLAB_KVM_DEVICE: `VLAB_KVM_DEVICE=/nonexistent
vlab doctor` shows what a machine without KVM gets; likewise $VLAB_TRACEFS for tracefs
(KVM's tracepoints, `vlab run --kernel-trace`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import tty
from dataclasses import dataclass
from typing import Callable

from .accel import explain_auto
from .kvm import Cap, Kvm, KvmError, KvmUnavailable, detect_backend, kvm_usable
from .kvm import vcpu as vcpu_module
from .machine import runloop as runloop_module
from .kvm.kernel_trace import KernelTrace, KernelTraceUnavailable, kernel_trace_usable
from .kvm.system import DEV_KVM, DEVICE_ENV, device_path
from .machine.assembler import AssemblerNotFound, assemble


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]  # returns the exit status
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register the decorated function as `vlab NAME`."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(run, help, arguments)
        return run
    return register


def _section(title: str) -> None:
    print(f"\n{title}")


def _rows(rows: list[tuple[str, ...]], indent: str = "  ") -> None:
    """Print rows as aligned columns (the last column is free text)."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        print(indent + "  ".join(cells).rstrip())


def _indented(text: str, indent: str) -> None:
    """Print `text` indented, long lines wrapped under their own start."""
    for line in text.splitlines():
        body = line.lstrip()
        lead = indent + line[:len(line) - len(body)]
        print(textwrap.fill(body, width=100, initial_indent=lead,
                            subsequent_indent=lead + "  " * body.startswith("- ")))


# --- vlab doctor ----------------------------------------------------------------------------
DOCTOR_CAPS = {
    Cap.USER_MEMORY: "guest RAM from this process's memory (SET_USER_MEMORY_REGION)",
    Cap.SET_TSS_ADDR: "real-mode support pages on Intel (SET_TSS_ADDR)",
    Cap.EXT_CPUID: "CPUID tables (GET_SUPPORTED_CPUID, SET_CPUID2)",
    Cap.IRQCHIP: "in-kernel PIC, IOAPIC and local APICs",
    Cap.PIT2: "in-kernel i8254 timer",
    Cap.SET_GUEST_DEBUG: "single-step and hardware breakpoints",
    Cap.IMMEDIATE_EXIT: "stopping a running vCPU without a race",
    Cap.SYNC_REGS: "registers in kvm_run at every exit, without GET_REGS",
    Cap.BINARY_STATS_FD: "KVM's own counters (GET_STATS_FD)",
    Cap.X86_USER_SPACE_MSR: "RDMSR/WRMSR exits to userspace",
    Cap.X86_MSR_FILTER: "choosing which MSRs exit (X86_SET_MSR_FILTER)",
    Cap.GET_TSC_KHZ: "reading the guest's TSC frequency",
    Cap.TSC_CONTROL: "setting the guest's TSC frequency (SET_TSC_KHZ)",
    Cap.READONLY_MEM: "read-only slots: ROM whose writes exit as MMIO",
    Cap.XSAVE: "extended FPU/vector state",
    Cap.XCRS: "XCR0 (GET/SET_XCRS)",
    Cap.DEBUGREGS: "DR0-DR7 (GET/SET_DEBUGREGS)",
    Cap.VCPU_EVENTS: "pending exceptions, interrupts, NMIs (GET/SET_VCPU_EVENTS)",
    Cap.NR_VCPUS: "recommended most vCPUs per VM",
    Cap.MAX_VCPUS: "most vCPUs per VM",
}

PYTHON_MODULES = {"unicorn": "the tcg accelerator (software emulation)",
                  "capstone": "disassembly at RIP"}


def _nasm() -> tuple[bool, str]:
    """(found, version or the install hint), asking the assembler the lab uses."""
    try:
        assemble("nop")
    except AssemblerNotFound as missing:
        return False, str(missing)
    version = subprocess.run(["nasm", "-v"], capture_output=True, text=True, timeout=10)
    return True, version.stdout.strip()


def _import(name: str) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return False, f"cannot import {name} ({e}); install it with `pip install {name}`"
    return True, getattr(module, "__version__", "installed")


def _exit_path() -> tuple[str, str, str]:
    """Whether setup.py built the C exit path and the compiled run loop; the lab works
    without them, slower."""
    purpose = "VcpuFd.run() decoding port-I/O exits in C"
    decoding = ("compiled (vlab.kvm._exitpath)" if vcpu_module._exitpath is not None else
                "not built, so exits are decoded in Python (about 0.05 of a C loop's rate slower)")
    loop = ("the run loop: compiled (vlab.machine._runloop), about 0.9 of a C loop's rate with "
            "every exit recorded" if runloop_module._runloop is not None else
            "the run loop: not built, so VcpuRunner runs its Python loop (about half a C "
            "loop's rate)")
    try:
        from .accel.tcg import engine as tcg_engine
    except ImportError:   # no Unicorn: no tcg, nothing for its hooks to be
        tcg_hooks, tcg_built = "", True
    else:
        tcg_built = tcg_engine._insnhooks is not None
        tcg_hooks = ("; tcg's port-I/O hooks: compiled (vlab.accel.tcg._insnhooks)" if tcg_built
                     else "; tcg's port-I/O hooks: not built, so Unicorn calls Python through "
                          "ctypes (about 1 us more per port access)")
        if tcg_built and runloop_module._runloop is not None:
            tcg_hooks += (", the run loop's C handling the debug console, unclaimed ports and "
                          "the 16550's polling inside emulation")
    fix = ("; install gcc and Python's headers (python3-dev), then `pip install -e .` again"
           if None in (vcpu_module._exitpath, runloop_module._runloop) or not tcg_built else "")
    return ("ok" if not fix else "python", "exit path",
            f"{purpose}: {decoding}; {loop}{tcg_hooks}{fix}")


def _kernel_trace() -> tuple[str, str, str]:
    """Whether KVM's tracepoints can be read (vlab.Lab(kernel_trace=True), run --kernel-trace)."""
    usable, why = kernel_trace_usable()
    purpose = "inside KVM_RUN, from KVM's tracepoints (kernel_trace=True)"
    return ("ok" if usable else "MISSING", "kernel trace",
            f"{purpose}: {why.removeprefix('kernel tracing is unavailable: ')}".replace("\n  fix: ", "; fix: "))


@command("doctor", "can this machine run the lab? (KVM, backend, capabilities, tools)")
def doctor(args: argparse.Namespace) -> int:
    """Check that this machine can run the lab; exit 0 when it can (on kvm or on tcg)."""
    print("vlab doctor: can this machine run the lab?")
    path = device_path()
    usable, why = kvm_usable(path)
    _section("KVM")
    first, *hint = why.splitlines()
    print(f"  {'ok' if usable else 'NOT USABLE'}  {first}")
    _indented("\n".join(hint), "    ")
    _indented(detect_backend().describe(), "  ")

    if usable:
        with Kvm(path) as kvm:
            rows = [(cap.name, str(kvm.check_extension(cap)), phrase)
                    for cap, phrase in DOCTOR_CAPS.items()]
        _section("capabilities (KVM_CHECK_EXTENSION; 0 = absent)")
        _rows(rows)

    _section("accelerator")
    accel, reason = explain_auto()
    _indented(reason.splitlines()[0], "  ")  # the hint, if any, is printed above

    _section("tools")
    tools = {"nasm": (*_nasm(), "assembling guest code typed in a cell")}
    tools.update((name, (*_import(name), purpose)) for name, purpose in PYTHON_MODULES.items())
    _rows([("ok" if found else "MISSING", name, f"{purpose}: {detail}")
           for name, (found, detail, purpose) in tools.items()] + [_exit_path(), _kernel_trace()])

    tcg_usable = tools["unicorn"][0]
    _section("verdict")
    if usable or tcg_usable:
        print(f"  the lab can run here: `auto` picks {accel}")
        return 0
    print("  the lab cannot run here: KVM is not usable and Unicorn (for tcg) is missing")
    return 1


# --- vlab caps --------------------------------------------------------------------------------
def _caps_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true",
                        help="also list the capabilities this KVM lacks (value 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON object {name: value}")


@command("caps", "every KVM capability with its value", _caps_arguments)
def caps(args: argparse.Namespace) -> int:
    """Every KVM_CAP with the value KVM_CHECK_EXTENSION gives on the KVM device: present
    ones first, each group in the kernel's numbering."""
    try:
        with Kvm() as kvm:
            values = kvm.capabilities()
    except KvmError as e:
        print(f"vlab caps: {e}", file=sys.stderr)
        return 1
    listed = sorted(values.items(), key=lambda item: item[1] == 0)
    if not args.all:
        listed = [(cap, value) for cap, value in listed if value]
    if args.json:
        print(json.dumps({cap.name: value for cap, value in listed}, indent=2))
        return 0
    _rows([(str(int(cap)), f"KVM_CAP_{cap.name}", str(value)) for cap, value in listed], indent="")
    present = sum(1 for value in values.values() if value)
    print(f"\n{present} of {len(values)} capabilities present"
          + ("" if args.all else "; --all lists the absent ones too"))
    return 0


# --- vlab run ---------------------------------------------------------------------------------
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?",
                        help="guest program: .asm (nasm source), .elf, or raw code")
    parser.add_argument("--mode", choices=["real", "protected", "paged", "long"],
                        help="CPU mode to start in (default: real; for an ELF, from its class)")
    parser.add_argument("--org", type=lambda text: int(text, 0),
                        help="load address of raw code, and the default org of .asm "
                             "(default 0x8000)")
    parser.add_argument("--accel", choices=["kvm", "tcg", "auto"], default="auto")
    parser.add_argument("--memory", help="guest RAM, e.g. 16M or 1G (default 16M; 256M with "
                                         "--linux)")
    parser.add_argument("--timeout", type=float, help="stop the guest after this many seconds")
    parser.add_argument("--kernel-trace", action="store_true",
                        help="trace KVM inside each KVM_RUN (its tracepoints; root, kvm only) and "
                             "print its exits by reason, handled in the kernel or not")
    parser.add_argument("--cpu", type=_cpu_spec, metavar="MODEL[,+feat,-feat]",
                        help="the CPU model, as QEMU's -cpu: host (default), max or qemu64, "
                             "then features turned on (+feat, feat=on) or off (-feat, feat=off)")
    multiboot = parser.add_argument_group("Multiboot kernels, as QEMU's -kernel on a pc machine")
    multiboot.add_argument("--multiboot", metavar="KERNEL",
                           help="boot a Multiboot kernel instead of FILE (in-kernel irqchip and "
                                "PIT; kvm only)")
    multiboot.add_argument("--append", default="",
                           help="the kernel's arguments (QEMU's -append); a multiboot kernel's "
                                "command line is the KERNEL path, a space, then these")
    multiboot.add_argument("--module", action="append", default=[], metavar="'FILE [ARGS]'",
                           help="a boot module, as QEMU's -initrd (repeatable)")
    multiboot.add_argument("--smp", type=int, default=1,
                           help="vCPUs; all but the first wait for the guest's INIT/SIPI")
    multiboot.add_argument("--reboot", action="store_true",
                           help="when the guest resets the machine (port 0x92, 0xcf9), boot "
                                "again instead of stopping (QEMU without -no-reboot)")
    linux = parser.add_argument_group(
        "Linux, as QEMU's -kernel -initrd -append (also --append, --smp, --reboot above)")
    linux.add_argument("--linux", metavar="KERNEL",
                       help="boot a Linux bzImage, or an ELF vmlinux with a PVH note, instead "
                            "of FILE (kvm only; `vlab linux-kernel` finds one); give it "
                            "--append console=ttyS0 to see its console")
    linux.add_argument("--initrd", metavar="FILE",
                       help="its initrd or initramfs (`vlab initramfs` builds a busybox one)")


def _cpu_spec(text: str) -> str:
    """Check a --cpu value's model and feature names before anything runs."""
    from .lab.cpuid import parse_cpu_spec
    try:
        parse_cpu_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cpu_model(spec: str | None):
    """The CPUID table builder for --cpu (None: KVM's whole table, as -cpu host)."""
    if spec is None:
        return None
    from .lab.cpuid import CpuidTable
    return lambda host: CpuidTable.from_spec(spec, host).entries


def _without_kvm(error: KvmUnavailable, option: str | None) -> str:
    """KVM cannot be opened: what this command can do instead (the error's own hint names
    the Python API). `option`: --multiboot or --linux, when one was given."""
    first = str(error).splitlines()[0]
    if option:
        return (f"{option} needs KVM, which cannot be used here ({first}): the "
                "PC's interrupt controllers and timer are KVM's in-kernel devices, which the "
                "software accelerator lacks. Without KVM, `vlab run FILE --accel tcg` runs a "
                "guest program (.asm, .elf or raw code); `vlab doctor` says how to make "
                "/dev/kvm usable.")
    return (f"{first}\n  without KVM, `vlab run FILE --accel tcg` runs the guest on the "
            "software accelerator; `vlab doctor` says how to make /dev/kvm usable.")


@command("run", "run a guest program, stream its console output, show its exits", _run_arguments)
def run(args: argparse.Namespace) -> int:
    """Run a guest program until it halts, fails, writes isa-debug-exit, times out or is
    interrupted (Ctrl-C); print what it writes to the serial port and the debug console as
    it comes, then the stop reason and the histogram of its exits. The exit status is the
    guest's isa-debug-exit status, else 0 when it halted and 1 otherwise; with --multiboot,
    where HLT sleeps in the kernel, else 2 (a vCPU stopped), 124 (timeout) or 130 (Ctrl-C)."""
    ended_line = True

    def stream(data: bytes) -> None:
        nonlocal ended_line
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        ended_line = data.endswith(b"\n")

    if [args.file, args.multiboot, args.linux].count(None) != 2:
        print("vlab run: give one of FILE, --multiboot KERNEL or --linux KERNEL", file=sys.stderr)
        return 2
    if args.initrd and not args.linux:
        print("vlab run: --initrd goes with --linux (a multiboot kernel takes --module)",
              file=sys.stderr)
        return 2
    if args.module and not args.multiboot:
        print("vlab run: --module goes with --multiboot (Linux takes --initrd)", file=sys.stderr)
        return 2
    try:
        trace = KernelTrace() if args.kernel_trace else None
    except KernelTraceUnavailable as e:
        print(f"vlab run: {e}", file=sys.stderr)
        return 2
    from .machine.runloop import SIGINT
    # Ctrl-C stops the guest; one more after that changes nothing: the guest's status and
    # the summary are still given, and the process ends with that status.
    with SIGINT.held():
        try:
            status = _run(args, stream, trace, lambda: ended_line)
        finally:
            if trace is not None:
                trace.close()
    if SIGINT.interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


@contextlib.contextmanager
def _keys_at_once():
    """A terminal on stdin sends each key as it is typed and does not echo it (the guest's
    tty echoes), as QEMU's -serial stdio; Ctrl-C still stops the run. Restored after."""
    if not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setcbreak(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _stdin_to_serial(machine):
    """What arrives on stdin goes to COM1's receiver as fast as its FIFO takes it (QEMU's
    chardev asks can_receive the same way): the interactive initramfs's shell reads it."""
    serial, closed = machine.devices["serial0"], threading.Event()
    machine.on_close.append(closed.set)

    def pump() -> None:
        pending = b""
        while not closed.is_set():
            if not pending:
                pending = os.read(0, 4096)
                if not pending:
                    return
            taken = serial.feed_what_fits(pending)
            pending = pending[taken:]
            if not taken:
                closed.wait(0.01)

    threading.Thread(target=pump, name="stdin to COM1", daemon=True).start()
    return machine


def _run(args: argparse.Namespace, stream, trace: KernelTrace | None, ended_line) -> int:
    """`vlab run` once its arguments are checked: boot, then the summary (and the kernel's
    table of exits with --kernel-trace)."""
    from .machine.boot import BOOT_ERRORS, boot
    pc = dict(smp=args.smp, accel=args.accel, timeout=args.timeout, output=stream,
              cpu_model=_cpu_model(args.cpu), reboot=args.reboot, kernel_trace=trace)
    try:
        if args.multiboot:
            from .machine.pc import boot_multiboot
            booted = boot_multiboot(args.multiboot, append=args.append, modules=args.module,
                                    memory=args.memory or "16M", **pc)
        elif args.linux:
            from .machine.linux import DEFAULT_MEMORY, boot_linux
            from .machine.pc import create_linux_pc
            with _keys_at_once():
                booted = boot_linux(args.linux, args.initrd, append=args.append,
                                    memory=args.memory or DEFAULT_MEMORY,
                                    create=lambda accel, **kw: _stdin_to_serial(
                                        create_linux_pc(accel, **kw)), **pc)
        else:
            booted = boot(args.file, mode=args.mode, org=args.org, accel=args.accel,
                          memory=args.memory or "16M", timeout=args.timeout, output=stream,
                          cpu_model=_cpu_model(args.cpu), kernel_trace=trace)
    except KvmUnavailable as e:
        option = "--multiboot" if args.multiboot else "--linux" if args.linux else None
        print(f"vlab run: {_without_kvm(e, option)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise                    # not the guest's fault: main() ends quietly
    except BOOT_ERRORS as e:
        print(f"vlab run: {e}", file=sys.stderr)
        return 2
    if args.linux:
        print(("" if ended_line() else "\n") + booted.boot.summary())
    print(("" if ended_line() or args.linux else "\n") + booted.summary())
    if trace is not None:
        if args.file:   # a PC's (multiboot, Linux) summary has one table per vCPU
            print(f"\nexits by reason inside KVM_RUN (KVM's tracepoints):\n"
                  f"{booted.log.kernel_exit_table()}")
        print(f"kernel events lost: {trace.lost}")
    return booted.exit_code


# --- vlab linux-kernel, vlab initramfs -------------------------------------------------------
def _log(message: str) -> None:
    print(f"vlab: {message}", file=sys.stderr)


def _linux_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--package", help="a linux-image package (default: what apt's "
                                          "linux-image-6.12-amd64 or linux-image-amd64 "
                                          "depends on)")
    parser.add_argument("--vmlinux", action="store_true",
                        help="the ELF vmlinux inside it instead (boots through its PVH note, "
                             "without decompressing itself), extracted into the cache")


@command("linux-kernel", "the path of a Debian kernel to boot (found in /boot or fetched "
         "with apt into the cache)", _linux_kernel_arguments)
def linux_kernel(args: argparse.Namespace) -> int:
    """Print the path of a Debian kernel's bzImage: /boot/vmlinuz-VERSION when readable,
    else the cached copy, downloaded on first use with `apt-get download` (nothing but apt's
    sources) into $VLAB_CACHE or ~/.cache/vlab. For `vlab run --linux $(vlab linux-kernel)`."""
    from .machine import debian_kernel
    try:
        find = debian_kernel.linux_vmlinux if args.vmlinux else debian_kernel.linux_kernel
        path = find(args.package, log=_log)
    except (debian_kernel.KernelPackageError, OSError) as e:
        print(f"vlab linux-kernel: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _initramfs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shell", action="store_true",
                        help="/init gives a shell on the serial console instead of printing "
                             "/proc/cpuinfo and powering off")


@command("initramfs", "the path of a busybox initramfs for Linux guests (built once, cached)",
         _initramfs_arguments)
def initramfs(args: argparse.Namespace) -> int:
    """Print the path of a gzipped newc initramfs of Debian's busybox-static (apt-installed
    when missing): its /init prints "vlab-init: reached /init" and the first lines of
    /proc/cpuinfo, then powers off (`poweroff -f`); with --shell it gives a shell on ttyS0."""
    from .machine.debian_kernel import KernelPackageError
    from .machine.initramfs import build_initramfs
    try:
        path = build_initramfs("shell" if args.shell else "check", log=_log)
    except (KernelPackageError, OSError, subprocess.CalledProcessError) as e:
        print(f"vlab initramfs: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlab", description="vlab: build a real KVM virtual machine step by step.",
        epilog=f"The KVM device is {DEV_KVM}, or the path in ${DEVICE_ENV} (a missing path shows "
               "what a machine without KVM gets).")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub = subcommands.add_parser(name, help=cmd.help, description=cmd.run.__doc__)
        if cmd.arguments:
            cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`vlab run ... | head`): end as a shell tool does, quietly,
        # with the status of a SIGPIPE; stdout goes to /dev/null so its final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
