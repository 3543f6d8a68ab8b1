"""A Debian kernel boots to /init on the PC Linux needs (vlab.machine.pc.create_linux_pc), on
a KVM that runs guest kernel code natively (VMX, SVM: `./run-tests --host svm` here), and
the interactive initramfs's shell runs what is typed into COM1, from `vlab run`'s stdin and
from the Dashboard's console.

On a backend that emulates CPL 0 (kvm_pvm) Linux cannot boot under any VMM; what it shows
there, the explained emulation failure, is tests/kvm/test_linux.py's. Each boot is bounded
by BOOT_TIMEOUT (the SVM test host runs a boot in well under a minute).
"""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlab.kvm import detect_backend
from vlab.machine.debian_kernel import linux_kernel
from vlab.machine.initramfs import MARKER, PROLOGUE, build_initramfs
from vlab.machine.linux import boot_linux
from vlab.machine.pc import BY_POWEROFF, BY_RESET, create_linux_pc
from vlab.widgets import Dashboard

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 240
APPEND = "console=ttyS0 panic=-1"
# The interactive initramfs: its banner, then busybox sh's prompt on the serial console.
SHELL_READY = re.compile(rb"exit powers off.*[#$] ", re.S)

pytestmark = pytest.mark.skipif(
    detect_backend().emulates_kernel_mode,
    reason="this KVM backend emulates guest kernel code (kvm_pvm): Linux stops in its "
           "emulator, which tests/kvm/test_linux.py checks")


@pytest.fixture(scope="module")
def kernel():
    return linux_kernel(log=lambda msg: None)


def boot(kernel, initrd, append=APPEND, **options):
    return boot_linux(kernel, initrd, append=append, create=create_linux_pc,
                      timeout=BOOT_TIMEOUT, **options)


def test_linux_boots_to_init_and_powers_off_through_acpi(kvm, kernel):
    result = boot(kernel, build_initramfs("check", log=lambda msg: None))
    assert MARKER in result.console, result.summary() + "\n" + result.console[-3000:]
    assert re.search(r"^vendor_id\s*:", result.console, re.M)       # /proc/cpuinfo's head
    # the hypervisor bit (QEMU's -cpu host) leads Linux to KVM's signature leaf
    assert "Hypervisor detected: KVM" in result.console, result.console[:3000]
    # `poweroff -f` entered ACPI S5 through PM1a_CNT: the run ended there, exit code 0
    assert result.ended_by == BY_POWEROFF, result.summary()
    assert "ACPI S5" in result.stop_reason and result.exit_code == 0


PROBE_INIT = PROLOGUE.format(marker=MARKER) + """\
echo "irq: $(grep -E ' (ttyS0|i8042)$' /proc/interrupts | tr -s ' ' | tr '\\n' ';')"
echo "rtc: $(cat /sys/class/rtc/rtc0/since_epoch) $(cat /sys/class/rtc/rtc0/name)"
reboot -f
"""


@pytest.fixture(scope="module")
def probe_initrd(tmp_path_factory):
    """/init prints the interrupt counts of ttyS0 and the i8042, and the RTC's time, then
    reboots (reboot(2) at once)."""
    return build_initramfs(init=PROBE_INIT, cache=tmp_path_factory.mktemp("initrd"),
                           log=lambda msg: None)


def test_linux_serial_interrupts_rtc_and_reboot_through_the_i8042(kvm, kernel, probe_initrd):
    """The 8250 driver writes /init's output on THR-empty interrupts (IRQ 4 counted in
    /proc/interrupts), rtc-cmos reads the CMOS RTC (its time is the host's), and `reboot=k`
    resets through the i8042's command 0xFE, which ends the run, as QEMU's -no-reboot.
    (Linux's default reboot writes the FADT's reset register, 0xcf9, which the multiboot
    tests cover.)"""
    result = boot(kernel, probe_initrd, append=f"{APPEND} reboot=k")
    console = result.console
    assert MARKER in console, result.summary() + "\n" + console[-3000:]
    irqs = re.search(r"^irq: (.*)$", console, re.M).group(1)
    counts = {fields[-1]: int(fields[1]) for fields in
              (entry.split() for entry in irqs.split(";") if entry.strip())}
    assert counts.get("ttyS0", 0) > 0, irqs
    assert "i8042" in counts, irqs          # the driver found the controller and its IRQs
    rtc = re.search(r"^rtc: (\d+) (\S+)", console, re.M)
    assert rtc and rtc.group(2) == "rtc_cmos", console[-2000:]
    assert abs(int(rtc.group(1)) - time.time()) < BOOT_TIMEOUT
    assert result.ended_by == BY_RESET, result.summary()
    assert "i8042 command 0xfe" in result.stop_reason


class Typist:
    """Reads a `vlab run` process's output in a thread; `wait_for` a pattern in it, all the
    waits of a test within one deadline."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        self.proc, self.deadline, self.seen = proc, deadline, bytearray()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            with self.changed:
                self.seen += chunk
                self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern, since: int = 0) -> int:
        """Where `pattern` ends in the output after offset `since`."""
        with self.changed:
            while (found := pattern.search(self.seen, since)) is None:
                left = self.deadline - time.monotonic()
                assert left > 0 and self.reader.is_alive(), (
                    f"no {pattern.pattern!r} in the console:\n{self.text[-3000:]}")
                self.changed.wait(min(left, 1))
            return found.end()

    def type(self, line: bytes) -> None:
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    @property
    def text(self) -> str:
        return self.seen.decode(errors="replace")


def test_vlab_run_types_stdin_into_the_interactive_shell(kvm, kernel):
    """`vlab initramfs --shell` under `vlab run --linux`: what arrives on stdin reaches the
    shell on ttyS0 through COM1's receiver; a command's output comes back and `exit`
    powers off, which ends the run."""
    shell = build_initramfs("shell", log=lambda msg: None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlab.cli", "run", "--linux", str(kernel), "--initrd",
         str(shell), "--append", f"{APPEND} quiet", "--timeout", str(BOOT_TIMEOUT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    typist = Typist(proc, time.monotonic() + BOOT_TIMEOUT + 60)
    try:
        ready = typist.wait_for(SHELL_READY)
        typist.type(b"echo typed-$((6 * 7))")
        typist.wait_for(re.compile(rb"^typed-42\r?$", re.M), ready)   # the shell computed it
        typist.type(b"exit")
        status = proc.wait(max(typist.deadline - time.monotonic(), 1))
    finally:
        proc.kill()
        proc.wait()
        typist.reader.join(10)
    assert status == 0, typist.text[-3000:]
    assert "the guest powered off" in typist.text, typist.text[-3000:]


def test_dashboard_console_types_into_the_interactive_shell(kvm, make_lab, kernel):
    """The Dashboard's console box feeds COM1 as a learner's Enter does, while the stepper
    runs Linux in the background: the shell's answer shows in the console, `exit` ends
    the run. (A line goes to the receiver at once: it must fit the 16550's 16-byte FIFO.)"""
    lab = make_lab(memory="256M", irqchip=True)
    lab.load_linux(kernel, build_initramfs("shell", log=lambda msg: None), f"{APPEND} quiet")
    lab.bring_up()
    dashboard = Dashboard(lab)
    console = dashboard.console
    deadline = time.monotonic() + BOOT_TIMEOUT

    def wait_for(pattern: re.Pattern, since: int = 0) -> int:
        while (found := pattern.search(console.text.encode(), since)) is None:
            assert time.monotonic() < deadline and dashboard.stepper.running, (
                f"no {pattern.pattern!r} in the console ({dashboard.stepper.status_text}):\n"
                f"{console.text[-3000:]}")
            time.sleep(0.2)
        return found.end()

    dashboard.stepper.next_stage()            # kvm_cpu_exec: the first run, in a thread
    try:
        ready = wait_for(SHELL_READY)
        console.input.value = "echo $((6*7))"     # Enter: the line and "\r" to COM1
        assert "sent 14 bytes to COM1" in console.status.value
        wait_for(re.compile(rb"^42\r?$", re.M), ready)
        console.input.value = "exit"
        assert dashboard.stepper.wait(max(deadline - time.monotonic(), 1)), console.text[-3000:]
    finally:
        if dashboard.stepper.running:
            lab.stop("the test's deadline")
            dashboard.stepper.wait(30)
    assert "the guest powered off" in lab.last_run.stop_reason, lab.last_run
