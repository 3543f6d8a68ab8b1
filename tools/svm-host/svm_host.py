#!/usr/bin/env python3
"""Run pytest on a second KVM host: AMD SVM, emulated by QEMU's TCG on this machine.

QEMU's TCG with `-cpu max` offers SVM, so a Debian kernel booted under it loads kvm_amd and
gives a real /dev/kvm with SVM semantics (10-13x slower than this machine's KVM). This
script prepares that host from Debian's apt (qemu-system-x86, busybox-static, a linux-image
package), caches the kernel and the module initramfs in .cache/svm-host/, boots it with this
machine's root shared read-only over 9p and runs the checkout's pytest inside, streaming its
output; the exit status is pytest's.

Usage: svm_host.py [pytest args]   (default: tests/kvm)
       svm_host.py --python SCRIPT [args]   (the checkout's Python runs SCRIPT instead)
Settings (environment): VLAB_SVM_TIMEOUT (seconds for pytest, default 2400), VLAB_SVM_CPU
(QEMU -cpu, default max,-npt), VLAB_SVM_SMP (default 1), VLAB_SVM_KERNEL (a linux-image
package, default the newest linux-image-<series>-amd64 apt offers).
"""
from __future__ import annotations

import gzip
import lzma
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))   # vlab's apt and initramfs helpers: standard library only
from vlab.machine.debian_kernel import (KernelPackageError, cache_dir,  # noqa: E402
                                        extract_vmlinux, install_packages, kernel_package,
                                        linux_kernel, run, store_bzimage, unpack_package, unzstd)
from vlab.machine.initramfs import (DATA, DIR, FILE, INIT_SCRIPTS, LINK,  # noqa: E402
                                    build_initramfs, cpio_newc)

CACHE = CHECKOUT / ".cache" / "svm-host"
INIT = Path(__file__).with_name("init")
APT_PACKAGES = ("qemu-system-x86", "busybox-static")   # busybox-static: /bin/busybox, no libc
# kvm_amd and the guest's 9p root, each loaded after its dependencies
MODULES = ("kvm_amd", "virtio_pci", "9pnet_virtio", "9p")
# Seconds allowed for each phase the guest announces; pytest's comes from VLAB_SVM_TIMEOUT.
PHASE_TIMEOUTS = {"boot": 240, "modules": 180, "kvm": 30, "mount": 120, "done": 60}
# From the pytest phase on, /init writes a heartbeat file every 5 s. QEMU 7.2's TCG can lose
# an interrupt request of the emulated CPU: its SVM #VMEXIT clears a bit of the CPU's
# `interrupt_request` without the lock under which QEMU's main loop sets them (fixed upstream
# in 2025: "treewide: clear bits of cs->interrupt_request with cpu_reset_interrupt()"). The
# local APIC timer's interrupt then waits in the IRR of a CPU that never takes it, and a
# guest kernel idle on that timer stops (its heartbeat with it). Any other interrupt makes
# QEMU look at the APIC again: HEARTBEAT_LATE seconds without a heartbeat, the host presses
# a key (the i8042's IRQ 1, which nothing in the guest reads); HEARTBEAT_LOST seconds, the
# guest's kernel no longer runs, no timeout inside it can fire, and the host ends the run.
HEARTBEAT_LATE = 15
HEARTBEAT_LOST = 120
REPORT_WAIT = 60      # seconds a live guest has to print its stall report
CONSOLE_TAIL = 15     # console lines repeated when a run stalls
HARNESS_ERROR = 125   # not a test result: the host could not be prepared or booted
TIMED_OUT = 124


class HostError(KernelPackageError):
    """The host could not be prepared or booted (the apt helpers raise their base class)."""


def log(msg: str) -> None:
    print(f"svm-host: {msg}", file=sys.stderr, flush=True)


# --- preparation ------------------------------------------------------------------------

def install_tools() -> None:
    """Install the Debian packages that are missing, as tools/setup.sh does."""
    install_packages(APT_PACKAGES, log)


def module_files(tree: Path) -> dict[str, Path]:
    return {re.sub(r"\.ko(\.xz|\.zst)?$", "", p.name).replace("-", "_"): p
            for p in tree.rglob("*.ko*")}


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return unzstd(data)
    return data


def module_closure(files: dict[str, Path]) -> list[tuple[str, bytes]]:
    """MODULES and what they depend on (the .modinfo `depends=` field), in load order."""
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:   # built into the kernel
            return
        blob = module_bytes(files[name])
        deps = re.search(rb"\0depends=([^\0]*)", blob)
        for dep in (deps.group(1).decode().split(",") if deps else []):
            if dep:
                add(dep.replace("-", "_"))
        order.append((name, blob))

    for name in MODULES:
        if name not in files and name == "kvm_amd":
            raise HostError(f"the kernel package has no {name} module")
        add(name)
    return order


def build_kernel(pkg: str, dest: Path) -> None:
    """Download `pkg`, keep its vmlinux and an initramfs of busybox and the modules; its
    bzImage goes to vlab's cache too (where `vlab linux-kernel` and the Linux tests find
    it), so one download serves both."""
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tree = unpack_package(pkg, Path(tmp), log)
        bzimage = store_bzimage(pkg, tree)
        # The ELF inside: QEMU boots it through its PVH note in seconds under TCG, where the
        # compressed bzImage takes ~40 s to decompress itself.
        (dest / "vmlinux").write_bytes(extract_vmlinux(bzimage.read_bytes()))
        modules = module_closure(module_files(tree))
        busybox = Path("/bin/busybox").read_bytes()
        applets = run(["/bin/busybox", "--list"], "busybox --list").stdout.split()
        entries = [(d, DIR, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "mnt",
                                             "mnt/host", "lib", "lib/modules")]
        entries.append(("bin/busybox", FILE, busybox))
        entries += [(f"bin/{a}", LINK, b"busybox") for a in applets if a != "busybox"]
        entries += [(f"lib/modules/{name}.ko", DATA, blob) for name, blob in modules]
        order = "".join(f"{name}\n" for name, _ in modules).encode()
        entries.append(("lib/modules/modules.order", DATA, order))
        (dest / "modules.cpio.gz").write_bytes(gzip.compress(cpio_newc(entries), 1))
        log(f"{pkg}: modules {' '.join(name for name, _ in modules)}")


def prepare() -> Path:
    """The cached kernel directory (vmlinux, modules.cpio.gz), built on first use."""
    install_tools()
    current = CACHE / "kernel"
    if os.environ.get("VLAB_SVM_KERNEL") or not (current / "modules.cpio.gz").exists():
        pkg = kernel_package(os.environ.get("VLAB_SVM_KERNEL"))
        dest = CACHE / pkg
        if not (dest / "modules.cpio.gz").exists():
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
            try:
                build_kernel(pkg, staging)
                if not (dest / "modules.cpio.gz").exists():   # or another run built it meanwhile
                    shutil.rmtree(dest, ignore_errors=True)
                    os.replace(staging, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log(f"prepared {pkg} in {time.monotonic() - started:.0f} s (cached in {dest})")
        link = CACHE / f".kernel-{os.getpid()}"   # replaced in one step: runs may overlap
        link.symlink_to(pkg)
        os.replace(link, current)
    return current


def linux_assets() -> str:
    """vlab's cache folder, with the Debian bzImage and the busybox initramfs (each variant)
    that the Linux boot tests use fetched or built there: the guest reads it (VLAB_CACHE)
    from the read-only root, where it could build neither."""
    linux_kernel(log=log)
    for variant in INIT_SCRIPTS:
        build_initramfs(variant, log=log)
    return str(cache_dir())


# --- the run ------------------------------------------------------------------------------

def write_job(results: Path, args: list[str], cache: str) -> None:
    """The script the guest runs in the chroot: pytest in the checkout, with its venv."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("VLAB_") and
                 not k.startswith("VLAB_SVM_")}
    env = {"HOME": "/dev/shm/home", "TMPDIR": "/dev/shm/tmp", "VLAB_CACHE": cache,
           "PATH": "/usr/local/bin:/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           # the stall report's SIGABRT makes each Python process print its threads' stacks
           "PYTHONFAULTHANDLER": "1",
           "PY_COLORS": "1" if sys.stdout.isatty() else "0",
           "COLUMNS": str(shutil.get_terminal_size().columns), **forwarded}
    python = CHECKOUT / ".venv" / "bin" / "python"
    lines = ["mkdir -p /dev/shm/home/.cache /dev/shm/tmp", f"cd {shlex.quote(str(CHECKOUT))}"]
    # matplotlib's font list, which it would otherwise rebuild from every font (~10 s there)
    fonts = Path.home() / ".cache" / "matplotlib"
    if fonts.is_dir():
        lines.append(f"cp -r {shlex.quote(str(fonts))} /dev/shm/home/.cache/")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if args[:1] == ["--python"]:    # a script instead of pytest (a benchmark)
        command = [str(python), *args[1:]]
    else:
        command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", *args]
    lines.append("exec " + shlex.join(command))
    (results / "job").write_text("\n".join(lines) + "\n")


def initrd(kernel: Path, results: Path) -> Path:
    """The cached module archive followed by the harness's /init (the kernel unpacks both)."""
    path = results / "initrd"
    init = gzip.compress(cpio_newc([("init", FILE, INIT.read_bytes())]), 1)
    path.write_bytes((kernel / "modules.cpio.gz").read_bytes() + init)
    return path


def qemu_command(kernel: Path, results: Path, cpu: str) -> list[str]:
    share = "local,security_model=none,multidevs=remap"
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", cpu,
        "-smp", os.environ.get("VLAB_SVM_SMP", "1"), "-m", "2G",
        "-display", "none", "-monitor", f"unix:{results / 'monitor'},server=on,wait=off",
        "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel / "vmlinux"), "-initrd", str(initrd(kernel, results)),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 svm_host.results={results}",
        "-virtfs", f"{share},path=/,mount_tag=hostroot,readonly=on",
        "-virtfs", f"{share},path={results},mount_tag=results",
    ]


def monitor(results: Path, command: str) -> str:
    """QEMU's answer to a human monitor `command` (the guest CPU's state, when the guest's
    own kernel cannot report it)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(results / "monitor"))

        def until_prompt() -> bytes:
            data = b""
            while not data.endswith(b"(qemu) "):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

        until_prompt()
        sock.sendall(command.encode() + b"\n")
        answer = until_prompt().decode(errors="replace")
    answer = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", answer).removesuffix("(qemu) ")
    return answer.split("\n", 1)[-1]   # past the echoed command


def heartbeat_age(results: Path) -> float | None:
    """Seconds since the guest last wrote its heartbeat; None before its first."""
    try:
        return time.time() - (results / "alive").stat().st_mtime
    except FileNotFoundError:
        return None


def wake(results: Path, age: float) -> None:
    """Press and release a key on the guest's PS/2 keyboard (see HEARTBEAT_LATE)."""
    try:
        monitor(results, "sendkey shift")
    except OSError as err:
        log(f"no heartbeat for {age:.0f} s, and QEMU's monitor did not answer: {err}")
        return
    log(f"no heartbeat for {age:.0f} s: a key press (IRQ 1) for QEMU's emulated CPU, whose "
        "timer interrupt may be lost")


def report_stall(qemu: subprocess.Popen, results: Path, why: str, tail: deque) -> None:
    """Say why the run stops and where: the last console lines, then from a guest whose
    kernel still runs its stall report (processes, kernel stacks, KVM events, Python stacks:
    /init's stall_report), else the emulated CPU's state from QEMU's monitor."""
    log(f"{why}; the console's last lines:")
    for line in tail:
        print(f"    {line.rstrip()}", flush=True)
    age = heartbeat_age(results)
    if age is not None and age < HEARTBEAT_LOST:
        log(f"the guest's kernel runs (heartbeat {age:.0f} s ago): its stall report follows")
        request = results / "dump"
        request.touch()
        deadline = time.monotonic() + REPORT_WAIT
        while request.exists() and qemu.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)   # the SIGABRTed processes' Python stacks
        return
    silence = f"no heartbeat for {age:.0f} s" if age is not None else "no heartbeat yet"
    log(f"the guest's kernel has stopped ({silence}): the emulated CPU's state from QEMU's "
        "monitor")
    try:
        for command in ("info registers", "x/4i $pc", "info lapic"):
            answer = monitor(results, command)
            print("".join(line for line in answer.splitlines(keepends=True)
                          if not re.match(r"(FPR|XMM|YMM)\d", line)), end="", flush=True)
    except OSError as err:
        log(f"QEMU's monitor did not answer: {err}")


def boot(results: Path, pytest_timeout: float) -> int:
    """Boot the guest, stream its console, enforce each phase's time; pytest's status."""
    kernel = prepare()
    # -npt: with nested paging, QEMU's SVM wedges when a guest sets EFER.LME with paging off
    cpu = os.environ.get("VLAB_SVM_CPU", "max,-npt")
    cmd = qemu_command(kernel, results, cpu)
    timeouts = {**PHASE_TIMEOUTS, "pytest": pytest_timeout}
    state = {"phase": "boot", "since": time.monotonic(), "error": None, "line_open": False}
    tail: deque = deque(maxlen=CONSOLE_TAIL)
    started = state["since"]
    log(f"booting {os.readlink(kernel)} under QEMU TCG (-cpu {cpu}, SVM emulated)")
    try:
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise HostError("qemu-system-x86_64 not found (Debian package qemu-system-x86)")

    def console() -> None:
        for raw in qemu.stdout:
            line = raw.decode(errors="replace").replace("\r\n", "\n")
            if re.match(r"\[ *[\d.]+\] reboot: Power down", line):
                continue
            marker = re.match(r"svm-host: (phase (\w+)|error: (.*)|done)", line)
            if marker:   # the harness's own lines: a phase begins, or a step failed
                if marker.group(3):
                    state["error"] = marker.group(3)
                    continue
                state["phase"] = marker.group(2) or "done"
                state["since"] = time.monotonic()
                if state["phase"] == "pytest":
                    log(f"guest up in {state['since'] - started:.0f} s, running pytest")
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            state["line_open"] = not line.endswith("\n")

    reader = threading.Thread(target=console, daemon=True)
    reader.start()
    woken = 0.0   # the heartbeat's time when the host last pressed a key
    pressed = None   # when it did, until the heartbeat is back
    while qemu.poll() is None:
        phase = state["phase"]
        age = heartbeat_age(results) if phase == "pytest" else None
        if time.monotonic() - state["since"] > timeouts[phase]:
            why = (f"timed out in phase '{phase}' after {timeouts[phase]:.0f} s"
                   f"{' (VLAB_SVM_TIMEOUT)' if phase == 'pytest' else ''}")
        elif age is not None and age > HEARTBEAT_LOST:
            why = f"the guest stopped in phase '{phase}': no heartbeat for {age:.0f} s"
        else:
            if age is not None and age > HEARTBEAT_LATE:
                beat = (results / "alive").stat().st_mtime
                if beat != woken:   # once per silence: a second key changes nothing
                    woken, pressed = beat, time.monotonic()
                    wake(results, age)
            elif pressed is not None and age is not None:
                log(f"heartbeat back {time.monotonic() - pressed:.0f} s after the key press")
                pressed = None
            time.sleep(0.5)
            continue
        report_stall(qemu, results, why, tail)
        qemu.kill()
        qemu.wait()
        reader.join(5)
        if state["line_open"]:
            print(flush=True)
        log(f"{why}; QEMU stopped")
        return TIMED_OUT
    reader.join(5)
    elapsed = time.monotonic() - started
    status = results / "status"
    if state["error"]:
        raise HostError(f"in phase '{state['phase']}': {state['error']}")
    if not status.exists():
        raise HostError(f"QEMU exited ({qemu.returncode}) in phase '{state['phase']}' "
                        f"without a pytest status, after {elapsed:.0f} s")
    rc = int(status.read_text())
    log(f"pytest exit status {rc}, {elapsed:.0f} s in the guest")
    return rc


def main(argv: list[str]) -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))  # this run's, shared rw
    try:
        write_job(results, argv or ["tests/kvm"], linux_assets())
        return boot(results, float(os.environ.get("VLAB_SVM_TIMEOUT", 2400)))
    except KernelPackageError as err:   # HostError, or apt's
        log(f"error: {err}")
        return HARNESS_ERROR
    finally:
        shutil.rmtree(results, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
