"""Boot a Multiboot kernel on a PC, as `qemu-system-x86_64 -accel kvm -kernel K -smp N` does.

The board is put together in QEMU's order:

1. `kvm_arch_init` (target/i386/kvm/kvm.c): KVM_SET_IDENTITY_MAP_ADDR at 0xfeffc000 and
   KVM_SET_TSS_ADDR one page above: pages Intel's KVM needs to run real-mode and unpaged
   code, placed below the 16 MiB BIOS window at 4 GiB, where no RAM is.
2. `kvm_irqchip_create` (accel/kvm/kvm-all.c): KVM_CREATE_IRQCHIP, which KVM accepts only
   before the first vCPU: the two 8259 PICs, the IOAPIC and a local APIC per vCPU, all
   emulated in the kernel.
3. `x86_cpus_init` (hw/i386/x86.c): `-smp N` vCPUs, each given KVM's CPUID table with its
   own APIC ID. `kvm_arch_reset_vcpu` leaves vCPU 0 (the bootstrap processor) runnable
   and every other one (an application processor) in KVM_MP_STATE_UNINITIALIZED: its
   KVM_RUN sleeps in the kernel until its local APIC receives INIT and then a start-up
   IPI from another CPU, and it wakes in real mode at the SIPI vector's page
   (SDM Vol. 3A 8.4, "Multiple-Processor (MP) Initialization").
4. `pc_memory_init` (hw/i386/pc.c): RAM from guest-physical 0.
5. `pc_basic_device_init`: the i8254 PIT, in the kernel (KVM_CREATE_PIT2, hw/i386/kvm/
   i8254.c), COM1, isa-debug-exit and fw_cfg (RAM size, CPU count); then `add_pc_devices`:
   the HPET at 0xfed00000, port 0x92, the PIIX3's reset register at 0xcf9 and pc-testdev
   (kvm-unit-tests' `-device pc-testdev`).
6. `load_multiboot` (hw/i386/multiboot.c): kernel, modules and information structure.
   QEMU then runs an option ROM (pc-bios/optionrom/multiboot.S) that enters protected
   mode and jumps to the kernel with EAX = 0x2BADB002 and EBX = the structure's address;
   here the BSP's registers are set to that state directly (Multiboot spec 3.2).

A20 needs no gate: KVM never masks guest-physical address bit 20, so A20 is always on, as
Multiboot requires (QEMU's port 0x92 and keyboard-controller A20 bits only act under TCG).

Each vCPU then runs in its own thread, as QEMU's "CPU n/KVM" threads do. With the
irqchip in the kernel, HLT no longer exits to userspace (KVM sleeps the vCPU until an
interrupt arrives), so the machine stops when the guest writes isa-debug-exit, when it
asks for a reset (port 0x92 or 0xcf9: the run ends as QEMU's with `-no-reboot`, unless
`reboot` is asked for), when any vCPU stops for good (a triple fault: QEMU would reset,
here the run ends), on timeout, or on Ctrl-C; every vCPU thread is then kicked out of
KVM_RUN.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..kvm.abi import MpState
from ..devices import (AcpiPm, CmosRtc, Hpet, HpetTicker, I8042, PcTestdev, Port92,
                       ResetControl)
from ..devices.hpet import BASE as HPET_BASE, SIZE as HPET_SIZE
from ..x86 import CR0_ET, CR0_PE, with_hypervisor_bit
from .board import TESTDEV_BASE, Machine, parse_size
from .acpi import BASE as ACPI_BASE, build_tables as build_acpi_tables
from .builder import build_board
from .cpu_modes import DEFAULT_LAYOUT, CpuMode, initial_regs, setup_mode
from .multiboot import MultibootBoot, load_multiboot
from . import runloop
from .runloop import BY_INTERRUPT, BY_TIMEOUT, BY_VCPU, RunResult, VcpuRunner, VcpuStuckError

DEFAULT_MEMORY = "128M"  # QEMU's default -m
MAX_CPUS = 255  # xAPIC IDs are 8 bits and 0xff is the broadcast address

# How a run ended: the guest wrote isa-debug-exit, asked for a reset, a vCPU stopped for
# good, time ran out, Ctrl-C; all but the first give the process exit codes below (guest
# statuses are odd). A guest's reset exits 0, as QEMU with -no-reboot does.
BY_GUEST = "isa-debug-exit"   # the others from runloop.run_vcpus
BY_RESET = "reset"
BY_POWEROFF = "poweroff"
EXIT_CODES = {BY_RESET: 0, BY_POWEROFF: 0, BY_VCPU: 2, BY_TIMEOUT: 124, BY_INTERRUPT: 130}  # 124 as timeout(1),
# 130 as SIGINT


@dataclass
class VcpuReport:
    """How one vCPU ended: its run's stop reason, its userspace exits by kind, its MP
    state, and KVM's counters of what the kernel handled itself (halts, interrupts...)."""
    index: int
    stop_reason: str
    exits: int
    rip: int
    mp_state: str
    histogram: dict[str, int]
    kernel: dict[str, int]
    explanation: str | None = None  # a fatal exit's: the instruction's bytes, disassembled
    kernel_exits: object = None     # with a KernelTrace: its ExitLog's kernel_exit_table()

    def __str__(self) -> str:
        exits = ", ".join(f"{name} {n}" for name, n in self.histogram.items()) or "none"
        kernel = ", ".join(f"{name}={n}" for name, n in self.kernel.items()) or "none"
        text = (f"vCPU {self.index}: {self.stop_reason}; KVM_MP_STATE_{self.mp_state}, "
                f"RIP={self.rip:#x}\n    {self.exits} userspace exits ({exits})"
                f"\n    in the kernel: {kernel}")
        if self.explanation:
            text += "".join(f"\n    {line}" for line in self.explanation.splitlines())
        if self.kernel_exits is not None:
            text += "\n    exits by reason inside KVM_RUN (KVM's tracepoints):" + "".join(
                f"\n      {line}" for line in str(self.kernel_exits).splitlines())
        return text


@dataclass
class PcResult:
    """What `boot_pc` saw: the guest's exit status (None if it never wrote
    isa-debug-exit), how and why the machine stopped, the console, what was loaded (a
    MultibootBoot or a LinuxBoot), each vCPU's end."""
    status: int | None
    ended_by: str
    stop_reason: str
    console: str
    seconds: float
    boot: object
    vcpus: list[VcpuReport]
    resets: int = 0  # times the guest reset the machine and booted again (`reboot`)

    @property
    def exit_code(self) -> int:
        """The process exit code: as QEMU's, the status's low 8 bits when the guest wrote
        isa-debug-exit; an even code from EXIT_CODES otherwise."""
        return self.status & 0xFF if self.status is not None else EXIT_CODES[self.ended_by]

    def summary(self) -> str:
        rebooted = f", after {self.resets} guest resets" if self.resets else ""
        lines = [f"{self.stop_reason} ({self.seconds:.3f} s{rebooted}; exit code "
                 f"{self.exit_code})"]
        lines += [f"  {report}" for report in self.vcpus]
        return "\n".join(lines)


def _open_kvm(accel: str):
    """The kvm accelerator: the irqchip, the PIT and INIT/SIPI are KVM's in-kernel devices,
    which the software accelerator does not have."""
    if accel not in ("kvm", "auto"):
        raise ValueError(f"this PC needs the kvm accelerator (the in-kernel irqchip "
                         f"and PIT); {accel!r} has neither")
    from ..accel.kvm import KvmAccelerator
    return KvmAccelerator("this PC needs the in-kernel irqchip")


def host_cpu_model(host: list) -> list:
    """QEMU's `-cpu host`: all of KVM's supported CPUID table, with the hypervisor bit that
    QEMU always adds (vlab.x86.with_hypervisor_bit, as vlab.lab.cpuid's models). Through it
    Linux finds KVM's signature leaf and trusts the platform's timer (kvm.c:
    `no_timer_check`); without it, it times the IO-APIC's timer interrupt against the TSC
    (timer_irq_works: 10 PIT ticks in 40 ms) and panics with "IO-APIC + timer doesn't
    work!" on a host too slow or busy to deliver them (seen on the SVM test host under load)."""
    return with_hypervisor_bit(host)


def create_pc(accel, *, memory: int | str = DEFAULT_MEMORY, smp: int = 1,
              cpu_model: Callable[[list], list] | None = None) -> Machine:
    """Steps 1-5 above: a VM with the in-kernel irqchip and PIT, `smp` vCPUs (the APs
    waiting for INIT/SIPI), RAM and the devices. `cpu_model` turns KVM's supported CPUID
    table into the vCPUs' (QEMU's -cpu; default: `host_cpu_model`)."""
    ram_size = parse_size(memory)
    if ram_size > TESTDEV_BASE:
        raise ValueError(f"memory {ram_size:#x}: this board keeps RAM in one slot below "
                         f"0x{TESTDEV_BASE:x} (QEMU would split it around the PCI hole)")
    if not 1 <= smp <= MAX_CPUS:
        raise ValueError(f"smp={smp}: give 1 to {MAX_CPUS} vCPUs")
    cpuid = (cpu_model or host_cpu_model)(accel.get_supported_cpuid())
    machine = build_board(accel, memory=ram_size, smp=smp, irqchip=True, cpuid=cpuid)
    try:
        add_pc_devices(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def add_pc_devices(machine: Machine) -> None:
    """What QEMU's `pc` has beyond the lab's board: the HPET (pc_basic_device_init), its
    interrupts through KVM_IRQ_LINE and timed by its own thread; port 0x92
    (pc_superio_init) and the PIIX3's reset control register, which stop the machine
    through `Machine.request_reset`; and pc-testdev."""
    vm = machine.vm.vm
    hpet = Hpet(irq=vm.irq_line)
    machine.mmio.register(HPET_BASE, HPET_SIZE, hpet)
    for device in (Port92(machine.request_reset), ResetControl(machine.request_reset)):
        machine.pio.register(device.IOBASE, device.SIZE, device)
        machine.devices[device.name] = device
    testdev = PcTestdev()
    testdev.register(machine.pio, machine.mmio)
    machine.devices.update({hpet.name: hpet, testdev.ports.name: testdev.ports,
                            testdev.iomem.name: testdev.iomem})
    ticker = HpetTicker(hpet)
    ticker.start()
    machine.on_close.append(ticker.stop)


COM1_IRQ = 4


def add_linux_devices(machine: Machine) -> None:
    """What Linux with `console=ttyS0` and no firmware needs beyond `add_pc_devices`
    (QEMU's `pc` has them all): COM1 on IRQ 4 through the in-kernel irqchip (Linux's 8250
    driver transmits on THR-empty interrupts once /init opens the console); the CMOS RTC at
    0x70 (rtc-cmos reads the time at boot); the i8042 at 0x60/0x64 (its driver probes it;
    `reboot=k` resets through it); ACPI's PM1 registers at 0x600 and the tables that
    describe them at 0xF0000 (`poweroff` enters S5 there and ends the run: vlab.machine.acpi
    says why ACPI, and which tables). 0xcf9, the FADT's reset register, is already there."""
    vm = machine.vm.vm
    machine.devices["serial0"].connect_irq(lambda level: vm.irq_line(COM1_IRQ, int(level)))
    for device in (CmosRtc(), I8042(irq=vm.irq_line, on_reset=machine.request_reset),
                   AcpiPm(on_poweroff=machine.request_poweroff)):
        machine.pio.register(device.IOBASE, device.SIZE, device)
        machine.devices[device.name] = device
    machine.memory.write(ACPI_BASE, build_acpi_tables(len(machine.runners)))


def create_linux_pc(accel, **options) -> Machine:
    """`create_pc` (same options), with `add_linux_devices`: the PC a Linux kernel boots on."""
    machine = create_pc(accel, **options)
    try:
        add_linux_devices(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def _module(spec: str | os.PathLike) -> tuple[str, bytes]:
    """QEMU's `-initrd "FILE ARGS"`: the file's bytes, the whole text as the module's string."""
    text = os.fspath(spec)
    path = text if isinstance(spec, os.PathLike) else text.split(" ", 1)[0]
    return text, Path(path).read_bytes()


# QEMU's option ROM (pc-bios/optionrom/multiboot.S) enters protected mode with
# `movl $1, %cr0`; ET is hard-wired to 1 on every CPU since the Pentium, so CR0 reads 0x11.
ENTRY_CR0 = CR0_PE | CR0_ET
UNNAMED_KERNEL = "kernel"  # argv[0] of a kernel given as bytes, which has no file name


def kernel_cmdline(kernel: bytes | str | os.PathLike, append: str) -> str:
    """QEMU's multiboot command line: the kernel's file name, a space, then -append (so a
    kernel reading it as argv finds its arguments from argv[1] on)."""
    name = UNNAMED_KERNEL if isinstance(kernel, (bytes, bytearray)) else os.fspath(kernel)
    return f"{name} {append}"


def load_kernel(machine: Machine, kernel: bytes | str | os.PathLike, *, append: str = "",
                modules: Sequence[str | os.PathLike] = ()) -> MultibootBoot:
    """Step 6: load the kernel and its modules, and put the BSP at the entry point in the
    state QEMU's option ROM leaves it (Multiboot spec 3.2 fixes the first five):

        EAX      0x2BADB002, the boot loader's magic
        EBX      the information structure's address
        CS       0x08: flat 32-bit code, base 0, limit 4 GiB, execute/read
        DS..SS   0x10: flat data, base 0, limit 4 GiB, read/write
        CR0      0x11: PE (protected mode) and ET; paging, NE, MP and WP off
        CR3, CR4, EFER   0: no paging, no extensions, no long mode
        EFLAGS   0x2: IF off (the ROM's `cli`), DF off (`cld`)
        ECX      the entry point (the ROM jumps through ECX)
        GDTR     a GDT of its own at 0x500 with the same 0x08 and 0x10 (QEMU's is in the ROM)
        IDTR     base 0, limit 0 (QEMU leaves the BIOS's real-mode IVT, limit 0x3ff, which
                 is no protected-mode IDT either): any exception is a triple fault
        TR       a busy 32-bit TSS at 0x600 (VM entry needs a usable TR)
        ESP      0x8000 (QEMU: somewhere in the BIOS's stack; the spec leaves it undefined)

    The command line is `kernel_cmdline`'s. The flat GDT goes into memory before the
    kernel, so a kernel loaded over it wins: the BSP's segment caches hold the flat
    segments anyway, and the spec has the kernel load its own GDT before it touches a
    segment register."""
    bsp = machine.runners[0].vcpu
    loaded = [_module(spec) for spec in modules]
    setup = setup_mode(CpuMode.PROTECTED, bsp.get_sregs(), machine.memory,
                       ram_size=machine.ram_size)
    boot = load_multiboot(machine.memory, kernel, cmdline=kernel_cmdline(kernel, append),
                          modules=loaded, ram_size=machine.ram_size)
    bsp.set_sregs(setup.sregs.replace(cr0=ENTRY_CR0))
    bsp.set_regs(initial_regs(CpuMode.PROTECTED, boot.entry, DEFAULT_LAYOUT.stack_top)
                 .replace(rax=boot.eax, rbx=boot.ebx, rcx=boot.entry))
    return boot


def run_vcpus(machine: Machine, *, timeout: float | None = None
              ) -> tuple[str, str, list[VcpuReport]]:
    """Run every vCPU in its own thread until the machine stops (see the module's
    docstring); return how (BY_*) and why, and how each vCPU ended."""
    run = runloop.run_vcpus(machine.runners, machine.accel.name, first_stops_all=True,
                            timeout=timeout)
    ended_by, reason = run.ended_by, run.reason
    if machine.reset_request is not None:
        ended_by = BY_RESET
        reason = f"the guest asked for a reset: {machine.reset_request}"
    if machine.poweroff_request is not None:
        ended_by = BY_POWEROFF
        reason = f"the guest powered off: {machine.poweroff_request}"
    if machine.exit_request is not None:
        ended_by = BY_GUEST
        reason = f"the guest wrote isa-debug-exit: status {machine.exit_request.status}"
    return ended_by, reason, [_report(r, result) for r, result in zip(machine.runners, run.results)]


def _report(runner: VcpuRunner, result: RunResult) -> VcpuReport:
    counters = runner.kernel_counters()
    kernel = {name: counters[name] for name in runner.counter_names if counters[name]}
    return VcpuReport(runner.vcpu.id, result.stop_reason, result.exits, result.rip,
                      MpState(runner.vcpu.get_mp_state()).name, runner.log.histogram(), kernel,
                      result.explanation,
                      runner.log.kernel_exit_table() if runner.kernel_trace is not None else None)


def reset_pc(machine: Machine, load: Callable[[Machine], object]) -> object:
    """A guest's reset, followed through (QEMU without -no-reboot): the devices back to
    their reset state, every AP waiting for INIT/SIPI again, and, as the firmware would
    boot the kernel again, `load` (the kernel reloaded and the BSP at its entry).
    RAM keeps what the guest wrote, as on a PC. Unlike QEMU's, the in-kernel irqchip, PIT
    and local APICs keep their state."""
    machine.reset_request = None
    for name in ("hpet", "port92", "i8042"):     # the i8042: on a Linux PC only
        if name in machine.devices:
            machine.devices[name].reset()
    for runner in machine.runners[1:]:
        runner.vcpu.set_mp_state(MpState.UNINITIALIZED)
    machine.runners[0].vcpu.set_mp_state(MpState.RUNNABLE)
    return load(machine)


def boot_multiboot(kernel: bytes | str | os.PathLike, *, append: str = "",
                   modules: Sequence[str | os.PathLike] = (), **options) -> PcResult:
    """Build the PC, load `kernel` with its command line `append` and `modules` (each
    "FILE [ARGS]", as QEMU's -initrd), and run it (`boot_pc`'s `options`)."""
    return boot_pc(lambda machine: load_kernel(machine, kernel, append=append, modules=modules),
                   **options)


def boot_pc(load: Callable[[Machine], object], *, smp: int = 1,
            memory: int | str = DEFAULT_MEMORY, accel: str = "kvm",
            timeout: float | None = None, output: Callable[[bytes], None] | None = None,
            cpu_model: Callable[[list], list] | None = None, reboot: bool = False,
            kernel_trace=None, create: Callable[..., Machine] = create_pc) -> PcResult:
    """Build the PC (`create`, `create_pc`'s arguments), `load` a guest into it (returns
    what it loaded), run until the guest exits, stops or `timeout` seconds pass, and close
    the machine. `output` receives console bytes as they come; `cpu_model` is
    `create_pc`'s. A guest's reset ends the run unless `reboot`: then the machine is reset
    (`reset_pc`, which loads the guest again) and runs on, within the same `timeout`.
    `kernel_trace` (a vlab.kvm.KernelTrace) gives each exit record its KVM_RUN's kernel
    events, and each vCPU's report the kernel's table of exits."""
    started = time.perf_counter()
    kvm = _open_kvm(accel)
    stuck = False
    try:
        machine = create(kvm, memory=memory, smp=smp, cpu_model=cpu_model)
    except BaseException:
        kvm.close()
        raise
    try:
        if output is not None:
            machine.console.listeners.append(output)
        for runner in machine.runners:
            runner.kernel_trace = kernel_trace
        boot = load(machine)
        resets = 0
        while True:
            left = None if timeout is None else max(timeout - (time.perf_counter() - started), 0)
            ended_by, reason, reports = run_vcpus(machine, timeout=left)
            if ended_by != BY_RESET or not reboot:
                break
            resets += 1
            boot = reset_pc(machine, load)
        status = machine.exit_request.status if machine.exit_request else None
        return PcResult(status, ended_by, reason, machine.console.text,
                        time.perf_counter() - started, boot, reports, resets)
    except VcpuStuckError:
        stuck = True  # closing would unmap kvm_run under a thread still inside KVM_RUN
        raise
    finally:
        if not stuck:
            machine.close()
            kvm.close()
