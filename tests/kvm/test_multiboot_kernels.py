"""The project's own Multiboot kernels (tests/kvm/kernels) booted on the PC of vlab.machine.pc.

Each kernel checks itself and reports through isa-debug-exit: EXIT_PASS (0) gives status 1,
EXIT_FAIL (1) gives status 3, and the console says what failed. The ELF kernels are built
with `nasm -f elf32` and `ld -m elf_i386`; trivial.asm and lowmem.asm are flat binaries
with the a.out kludge, built with `nasm -f bin`. pc.asm runs one check per boot, named by
its first argument after argv[0].
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlab.kvm import Kvm, detect_backend
from vlab.lab.cpuid import FEATURES, KVM_MAINTAINED_BITS, CpuidTable
from vlab.machine.multiboot import MultibootError
from vlab.machine.pc import (BY_GUEST, BY_INTERRUPT, BY_RESET, BY_TIMEOUT, BY_VCPU, EXIT_CODES,
                             boot_multiboot)

KERNELS = Path(__file__).parent / "kernels"
FLAT = {"trivial", "lowmem"}  # a.out-kludge kernels: flat binaries
REPO = Path(__file__).parents[2]
PASS = 1  # the status of EXIT_PASS: (0 << 1) | 1
TIMEOUT = 20.0  # seconds; ring-0 guest code may be emulated instruction by instruction

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not (shutil.which("nasm") and shutil.which("ld")),
                       reason="building the test kernels needs nasm and GNU ld (binutils)"),
]


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    """`kernel(name, *defines)`: the path of tests/kvm/kernels/NAME.asm, built once."""
    out = tmp_path_factory.mktemp("kernels")
    built: dict[tuple, Path] = {}

    def build(name: str, *defines: str) -> Path:
        key = (name, defines)
        if key not in built:
            source = KERNELS / f"{name}.asm"
            stem = out / "-".join((name, *defines))
            flags = [f"-D{d}" for d in defines]
            if name in FLAT:
                image = stem.with_suffix(".bin")
                _tool("nasm", "-f", "bin", *flags, f"-I{KERNELS}/", source, "-o", image)
            else:
                image = stem.with_suffix(".elf")
                obj = stem.with_suffix(".o")
                _tool("nasm", "-f", "elf32", *flags, f"-I{KERNELS}/", source, "-o", obj)
                # -n: no page alignment, so the ELF header is not loaded below 1 MiB.
                _tool("ld", "-m", "elf_i386", "-n", "-Ttext=0x100000", "-o", image, obj)
            built[key] = image
        return built[key]

    return build


def _tool(*argv) -> None:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stderr}"


def boot(image, **kwargs):
    kwargs.setdefault("timeout", TIMEOUT)
    return boot_multiboot(image, **kwargs)


def passed(result) -> None:
    """The kernel's own checks passed: status 1 and its PASS line."""
    assert (result.status, result.ended_by) == (PASS, BY_GUEST), result.console + result.summary()
    assert result.console.endswith("PASS\n")


def test_hello_sees_magic_memory_map_and_cmdline(kernel):
    image = kernel("hello")
    result = boot(image, memory="64M", append="console=ttyS0 quiet")
    passed(result)
    assert result.console.startswith("hello from a multiboot kernel\nA20 on\n")
    upper = (64 << 10) - 1024
    assert f"mem_lower=639 KiB mem_upper={upper} KiB\n" in result.console
    assert "mmap base=0x00000000 length=0x0009fc00 type=1\n" in result.console
    assert f"mmap base=0x00100000 length=0x{upper << 10:08x} type=1\n" in result.console
    assert f"cmdline='{image} console=ttyS0 quiet'\n" in result.console  # QEMU's argv[0]
    assert result.exit_code == 1


def test_empty_append_leaves_argv0_and_a_space(kernel):
    """QEMU's "%s %s" of the file name and an empty -append."""
    result = boot(kernel("hello"))
    passed(result)
    assert f"cmdline='{kernel('hello')} '\n" in result.console


def test_the_guest_status_passes_through(kernel):
    """exit=3 on the command line: the kernel writes 3, the status is (3 << 1) | 1."""
    result = boot(kernel("hello"), append="exit=3")
    assert (result.status, result.exit_code) == (7, 7)
    assert "PASS" not in result.console


def test_flat_binary_with_aout_kludge(kernel):
    result = boot(kernel("trivial"))
    assert result.status == PASS, result.summary()
    assert result.console == "hello from a trivial multiboot kernel\n"
    assert result.boot.header.kludge and result.boot.entry > 0x100000


def test_fw_cfg_signature_ram_size_and_cpu_count(kernel):
    result = boot(kernel("fwcfg"), memory="96M", smp=2)
    passed(result)
    assert "fw_cfg signature QEMU\nfw_cfg RAM size 96 MiB\nfw_cfg CPUs 2\n" in result.console


def test_application_processor_sleeps_until_started(kernel):
    """Nobody sends the AP INIT/SIPI: its KVM_RUN blocks in the kernel the whole run and
    returns only when kicked at the end, still KVM_MP_STATE_UNINITIALIZED."""
    result = boot(kernel("hello"), smp=2)
    passed(result)
    ap = result.vcpus[1]
    assert (ap.exits, ap.mp_state, ap.rip) == (0, "UNINITIALIZED", 0xFFF0)
    assert ap.stop_reason.startswith("isa-debug-exit")


def test_local_apic_registers_and_timer_interrupts(kernel):
    result = boot(kernel("lapic"))
    passed(result)
    assert "IA32_APIC_BASE 0xfee00900\nAPIC ID 0\n" in result.console
    assert "one-shot interrupt taken\n" in result.console
    assert "periodic interrupts taken\n" in result.console
    # The local APIC's MMIO and the kernel's HLTs never left the kernel: KVM slept the vCPU
    # in each HLT and woke it with the timer interrupt. Each of its two loops halts at least
    # once; a slow vCPU can take two ticks per wake-up and halt fewer times than the 4 ticks.
    bsp = result.vcpus[0]
    assert set(bsp.histogram) == {"IO in", "IO out"}
    assert bsp.kernel["halt_exits"] >= 2 and bsp.kernel["irq_injections"] >= 4


def test_protected_mode_iret(kernel):
    """KVM's instruction emulator has no protected-mode IRET; on kvm_pvm, which emulates
    all ring-0 code, returning from the timer interrupt with IRET stops the vCPU."""
    result = boot(kernel("lapic", "PLAIN_IRET"))
    if detect_backend().emulates_kernel_mode:
        assert result.ended_by == BY_VCPU
        assert "INTERNAL_ERROR" in result.stop_reason
        assert result.exit_code == EXIT_CODES[BY_VCPU]
    else:
        passed(result)


def test_pic_pit_and_ioapic_in_the_kernel(kernel):
    result = boot(kernel("irqchip"))
    passed(result)
    assert "IOAPIC version register 0x00170011\n" in result.console
    # it waits for 5 ticks; one more can land in the window between two checks
    ticks = re.search(r"PIT: IRQ 0 interrupts through the 8259: (\d+)\n", result.console)
    assert ticks and int(ticks.group(1)) >= 5
    assert result.vcpus[0].kernel["irq_injections"] >= 5


def symbol(image, name: str) -> int:
    """The address of `name` in an ELF kernel's symbol table (binutils' nm)."""
    result = subprocess.run(["nm", str(image)], capture_output=True, text=True, check=True)
    return next(int(address, 16) for address, _kind, symbol in map(str.split, result.stdout.splitlines())
                if symbol == name)


@pytest.mark.parametrize("smp", [2, 4])
def test_bsp_starts_aps_with_init_sipi_sipi(kernel, smp):
    """The BSP passes, and the machine stops, as soon as the last AP has counted itself in
    (`lock inc`) right before its `hlt; jmp` loop: nothing orders the stop after that AP's
    HLT. Nor does a halted AP always stay halted: when the second SIPI reaches an AP only
    after it has started and halted (the BSP's vCPU thread preempted between its two
    SIPIs), KVM wakes it (a pending SIPI makes a halted vCPU runnable), then drops the SIPI
    (the AP is not waiting for one), and the AP halts again at `jmp`. Measured on kvm_pvm,
    100 runs with two vCPUs: 3 found the AP running just past its HLT and 2 found it halted
    a second time; with a single SIPI, none. So each AP is found asleep in its HLT, or
    running at or just past it."""
    image = kernel("smp")
    result = boot(image, smp=smp)
    passed(result)
    for apic_id in range(1, smp):
        assert (f"BSP: INIT, SIPI, SIPI to APIC ID {apic_id}\n"
                f"AP up: APIC ID {apic_id}\n") in result.console
    hlt = symbol(image, "ap_main.halt")
    for ap in result.vcpus[1:]:
        assert (ap.mp_state, ap.rip) in {("HALTED", hlt + 1), ("RUNNABLE", hlt),
                                         ("RUNNABLE", hlt + 1)}, ap
        # KVM_RUN returned (EAGAIN) once when INIT woke the AP, and once (EINTR) when the
        # machine stopped and kicked it.
        assert ap.histogram["INTR"] >= 2


def test_modules_arrive_page_aligned_and_intact(kernel, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"vlab module: first line\nsecond line\n")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 40 + b"\n")
    result = boot(kernel("module"), modules=[f"{text} answer=42", blob])
    passed(result)
    assert "modules: 2\n" in result.console
    for spec, path in ((f"{text} answer=42", text), (str(blob), blob)):
        data = path.read_bytes()
        line = re.search(rf"module '{re.escape(spec)}' at 0x([0-9a-f]{{8}}) length (\d+) "
                         rf"sum 0x([0-9a-f]{{8}})\n", result.console)
        assert line, result.console
        start, length, total = int(line[1], 16), int(line[2]), int(line[3], 16)
        assert start % 4096 == 0 and length == len(data) and total == sum(data)
        assert (spec, start, start + length) in result.boot.modules
    assert "first line: vlab module: first line\n" in result.console


def test_timeout_kicks_a_vcpu_asleep_in_hlt(kernel):
    result = boot(kernel("stuck"), append="halt", timeout=0.5, smp=2)
    assert (result.status, result.ended_by) == (None, BY_TIMEOUT)
    assert result.exit_code == EXIT_CODES[BY_TIMEOUT]
    assert [v.mp_state for v in result.vcpus] == ["HALTED", "UNINITIALIZED"]
    assert result.seconds >= 0.5


def test_triple_fault_stops_the_machine(kernel):
    result = boot(kernel("stuck"), append="fault", smp=2)
    assert (result.status, result.ended_by) == (None, BY_VCPU)
    assert result.exit_code == EXIT_CODES[BY_VCPU]
    assert result.stop_reason.startswith("vCPU 0 stopped: SHUTDOWN")
    assert result.vcpus[1].stop_reason.startswith("machine stopped: vCPU 0 stopped")


def test_bad_kernel_is_refused_before_running(tmp_path):
    image = tmp_path / "not-a-kernel"
    image.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(MultibootError, match="no Multiboot header"):
        boot(image)


def test_only_kvm_has_the_in_kernel_irqchip(kernel):
    with pytest.raises(ValueError, match="needs the kvm accelerator"):
        boot(kernel("trivial"), accel="tcg")


# --- QEMU's -kernel, point by point (pc.asm and lowmem.asm) ------------------------------------
def test_argv0_is_the_kernel_path_and_arguments_follow(kernel):
    image = kernel("pc")
    result = boot(image, append="argv one  two")
    passed(result)
    assert f"argv[0]='{image}'\nargs='one  two'\n" in result.console


def test_a_kernel_over_0x9000_gets_its_information_after_it(kernel):
    """lowmem.asm covers 0x8000-0xa86b: QEMU's 0x9000 is inside it, so the information
    goes to the first page after it, and the kernel's own bytes there stay intact."""
    result = boot(kernel("lowmem"), append="low memory")
    passed(result)
    assert result.boot.ebx == 0xB000 and result.boot.entry < 0x9000
    assert "low kernel at 0x8000-0x0000a86b, multiboot information at 0x0000b000\n" \
           "args='low memory'\n" in result.console


def test_entry_cr0_is_the_option_roms(kernel):
    result = boot(kernel("pc"), append="cr0")
    passed(result)
    assert "CR0 at entry 0x00000011\n" in result.console


def test_unassigned_memory_reads_zero_and_ports_all_ones(kernel):
    result = boot(kernel("pc"), append="unassigned")
    passed(result)
    assert ("MMIO read of 0xe0000000: 0x00000000\nport 0x1234 read: 0xffffffff\n"
            in result.console)


def test_hpet_counter_ticks_and_timer0_interrupts(kernel):
    result = boot(kernel("pc"), append="hpet")
    passed(result)
    assert "HPET capabilities 0x8086a201, period 10000000 fs\nHPET counter ticks\n" \
           "HPET timer 0: interrupts on IRQ 0 through the 8259\n" in result.console
    assert result.vcpus[0].kernel["irq_injections"] >= 3  # KVM_IRQ_LINE from the HPET's thread


@pytest.mark.parametrize("check, cause", [
    ("reset92", "port 0x92 fast reset (wrote 0x03)"),
    ("resetcf9", "port 0xcf9 reset control (wrote 0x06)")])
def test_a_guest_reset_stops_the_machine_as_with_no_reboot(kernel, check, cause):
    result = boot(kernel("pc"), append=check)
    assert (result.status, result.ended_by, result.exit_code) == (None, BY_RESET, 0)
    assert result.stop_reason == f"the guest asked for a reset: {cause}"
    assert "FAIL" not in result.console and result.resets == 0


def test_reboot_resets_and_boots_again(kernel):
    """RAM survives the reset, so the kernel's boot count at 0x1000 reaches 2."""
    stopped = boot(kernel("pc"), append="reboot")
    assert (stopped.ended_by, stopped.console.count("boot ")) == (BY_RESET, 1)
    result = boot(kernel("pc"), append="reboot", reboot=True, smp=2)
    passed(result)
    assert result.resets == 1 and "boot 1\n" in result.console and "boot 2\nPASS\n" in result.console
    assert "after 1 guest resets" in result.summary()
    assert result.vcpus[1].mp_state == "UNINITIALIZED"  # the AP waits for INIT/SIPI again


def hidden_by_qemu64() -> tuple[str, int, str, int]:
    """A feature the host's KVM offers, qemu64 leaves out, in a leaf the guest's CPUID
    takes from the table on this backend (Backend.cpuid_raw_leaves), not one KVM
    maintains itself."""
    backend = detect_backend()
    with Kvm() as kvm:
        supported = kvm.get_supported_cpuid()
    host = CpuidTable.for_model("host", supported)
    qemu64 = CpuidTable.for_model("qemu64", supported)
    for name, (leaf, subleaf, reg, bit) in FEATURES.items():
        maintained = KVM_MAINTAINED_BITS.get((leaf, subleaf, reg), 0) >> bit & 1
        if (subleaf == 0 and leaf not in backend.cpuid_raw_leaves and not maintained
                and host.has(name) and not qemu64.has(name)):
            return name, leaf, reg, bit
    pytest.skip("this host's KVM offers no feature that qemu64 leaves out, outside the leaves "
                f"this backend ({backend.label}) answers from the host")


def cpuid_check(leaf: int, reg: str, bit: int, want: int) -> str:
    return f"cpuid {leaf:x} {reg[1]} {bit:x} {want}"


@pytest.mark.parametrize("spec, want", [("host", 1), ("max", 1), ("qemu64", 0),
                                        ("qemu64,+{name}", 1), ("host,-{name}", 0),
                                        ("host,{name}=off", 0)])
def test_cpu_model_shows_or_hides_a_feature(kernel, spec, want):
    name, leaf, reg, bit = hidden_by_qemu64()
    spec = spec.format(name=name)
    result = boot(kernel("pc"), append=cpuid_check(leaf, reg, bit, want),
                  cpu_model=lambda host: CpuidTable.from_spec(spec, host).entries)
    passed(result)
    assert f", bit {bit} = {want}\n" in result.console


def test_pc_testdev_ports_and_memory(kernel):
    result = boot(kernel("pc"), append="pctestdev")
    passed(result)
    assert "pc-testdev memory reads back\n" in result.console


# --- the command line: `vlab run --multiboot` ---------------------------------------------------
def vlab(*args, **popen):
    """`python -m vlab ARGS` from this checkout, as a subprocess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    return subprocess.Popen([sys.executable, "-m", "vlab", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.parametrize("append, status", [("", PASS), ("exit=3", 7)])
def test_cli_exits_with_the_guest_status(kernel, tmp_path, append, status):
    module = tmp_path / "module.txt"
    module.write_text("module line\n")
    run = vlab("run", "--multiboot", kernel("hello"), "--append", append, "--module", module,
               "--smp", 2, "--memory", "32M", "--accel", "kvm", "--timeout", TIMEOUT)
    out, err = run.communicate(timeout=TIMEOUT + 30)
    assert run.returncode == status, err.decode()
    assert out.decode().startswith("hello from a multiboot kernel\nA20 on\nmem_lower=639 KiB "
                                   f"mem_upper={31 * 1024} KiB\n")
    assert f"cmdline='{kernel('hello')} {append}'\n" in out.decode()


def test_cli_ctrl_c_stops_every_vcpu(kernel):
    run = vlab("run", "--multiboot", kernel("stuck"), "--append", "halt", "--smp", 2,
               "--timeout", 60)
    assert run.stdout.readline() == b"halting\n"  # the guest runs: stop it now
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == EXIT_CODES[BY_INTERRUPT], err.decode()
    assert b"interrupted by Ctrl-C" in out


def test_cli_cpu_qemu64_hides_a_feature_from_cpuid(kernel):
    name, leaf, reg, bit = hidden_by_qemu64()
    for spec, status in (("qemu64", PASS), ("host", 3)):  # 3: the kernel's FAIL
        run = vlab("run", "--multiboot", kernel("pc"), "--append", cpuid_check(leaf, reg, bit, 0),
                   "--cpu", spec, "--timeout", TIMEOUT)
        out, err = run.communicate(timeout=TIMEOUT + 30)
        assert run.returncode == status, (spec, out.decode(), err.decode())


def test_cli_refuses_an_unknown_cpu_model_or_feature(kernel):
    for spec, message in (("pentium", b"unknown CPU model 'pentium'"),
                          ("qemu64,+nosuch", b"unknown CPUID feature 'nosuch'")):
        run = vlab("run", "--multiboot", kernel("pc"), "--cpu", spec)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 2 and message in err, err.decode()


def test_cli_prints_the_instruction_kvm_could_not_emulate(kernel):
    """An x87 load from unassigned memory: KVM must emulate an MMIO access on every
    backend, and its emulator has no FLD m80 (escape_db in arch/x86/kvm/emulate.c)."""
    run = vlab("run", "--multiboot", kernel("pc"), "--append", "emulation",
               "--timeout", TIMEOUT)
    out, err = run.communicate(timeout=TIMEOUT + 30)
    assert run.returncode == EXIT_CODES[BY_VCPU], err.decode()
    text = out.decode()
    assert "INTERNAL_ERROR EMULATION" in text
    line = re.search(r"instruction at RIP \(32-bit code, bytes [A-Za-z ]+\): (0x[0-9a-f]+): "
                     r"db 2d 00 00 00 e0  fld xword ptr \[0xe0000000\]", text)
    assert line, text
    assert int(line[1], 16) == symbol(kernel("pc"), "x87_load")


def test_cli_cpu_applies_to_a_guest_program_too(tmp_path):
    """`vlab run FILE --cpu`: a real-mode guest prints the CPUID register's four bytes to
    the debug console."""
    name, leaf, reg, bit = hidden_by_qemu64()
    guest = tmp_path / "cpuid.asm"
    guest.write_text(f"mov eax, {leaf:#x}\nxor ecx, ecx\ncpuid\nmov eax, {reg}\nmov cx, 4\n"
                     "next: out 0xe9, al\nshr eax, 8\nloop next\nhlt\n")
    seen = {}
    for spec in ("host", "qemu64", f"qemu64,+{name}"):
        run = vlab("run", guest, "--accel", "kvm", "--cpu", spec, "--timeout", TIMEOUT)
        out, err = run.communicate(timeout=TIMEOUT + 30)
        assert run.returncode == 0, err.decode()
        seen[spec] = int.from_bytes(out[:4], "little") >> bit & 1
    assert seen == {"host": 1, "qemu64": 0, f"qemu64,+{name}": 1}


@pytest.mark.parametrize("name, append, status, last_line", [
    ("pc", "argv x", PASS, "PASS"), ("pc", "cr0", PASS, "PASS"),
    ("pc", "unassigned", PASS, "PASS"), ("pc", "hpet", PASS, "PASS"),
    ("pc", "pctestdev", PASS, "PASS"), ("lowmem", "low", PASS, "PASS"),
    ("pc", "reset92", 0, "reset through port 0x92"),
    ("pc", "resetcf9", 0, "reset through port 0xcf9")])
def test_cli_gives_each_kernels_verdict(kernel, name, append, status, last_line):
    """The same checks through `vlab run --multiboot`, as a test harness runs them: the
    guest's status (a reset: 0, as QEMU's -no-reboot), and the console as it came."""
    run = vlab("run", "--multiboot", kernel(name), "--append", append, "--accel", "kvm",
               "--timeout", TIMEOUT)
    out, err = run.communicate(timeout=TIMEOUT + 30)
    assert run.returncode == status, (out.decode(), err.decode())
    _, summary = out.decode().split(f"{last_line}\n", 1)
    if status == 0:
        assert summary.startswith("the guest asked for a reset: port 0x")
