"""A Debian kernel boots to /init on the PC Linux needs (vlab.machine.pc.create_linux_pc), on
a KVM that runs guest kernel code natively (VMX, SVM: `./run-tests --host svm` here).

On a backend that emulates CPL 0 (kvm_pvm) Linux cannot boot under any VMM; what it shows
there, the explained emulation failure, is tests/kvm/test_linux.py's. Each boot is bounded
by BOOT_TIMEOUT (the SVM test host runs a boot in well under a minute).
"""
import re
import time

import pytest

from vlab.kvm import detect_backend
from vlab.machine.debian_kernel import linux_kernel
from vlab.machine.initramfs import MARKER, PROLOGUE, build_initramfs
from vlab.machine.linux import boot_linux
from vlab.machine.pc import BY_POWEROFF, BY_RESET, create_linux_pc

BOOT_TIMEOUT = 240
APPEND = "console=ttyS0 panic=-1"

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
