"""A small PC-like board: guest RAM, the two buses, QEMU's standard debug devices, vCPUs.

The pieces are put together in QEMU's order by `vlab.lab`, one stage at a time; `Machine`
only owns them. Devices sit on the buses at the addresses QEMU's `pc` machine gives them
(`pc_basic_device_init`: COM1 at 0x3f8; isa-debugcon at 0xe9; isa-debug-exit at 0xf4;
fw_cfg at 0x510), so guests written for QEMU run here unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..devices import DebugConsole, FwCfg, IsaDebugExit, MmioTestDevice, Uart16550
from ..devices.bus import Bus
from ..x86 import PAGE_SIZE
from .cpu_modes import CpuMode, initial_regs, setup_mode
from .memory import GuestMemory
from .console import Console
from .runloop import VcpuRunner
from .exitlog import ExitLog

MiB = 1 << 20
TESTDEV_BASE = 0xD000_0000   # the MMIO test device's window (an unbacked hole)


def parse_size(size: int | str) -> int:
    """`16M`, `1G`, `512K` or a number of bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text, 0)
    except ValueError:
        raise ValueError(f"memory size {size!r}: write a number of bytes or e.g. 16M, 1G") from None


def check_ram_size(size: int | str) -> int:
    """Guest RAM in bytes, checked against the board: whole pages, and one block from
    address 0 that ends below the MMIO test device's window (no RAM above 4 GiB here)."""
    value = parse_size(size)
    if value <= 0 or value % PAGE_SIZE:
        raise ValueError(f"memory {size!r}: guest RAM is a positive number of whole "
                         f"{PAGE_SIZE}-byte pages, e.g. 16M")
    if value > TESTDEV_BASE:
        raise ValueError(f"memory {size!r} is more than this board holds: its RAM is one block "
                         f"from address 0 up to the MMIO window at {TESTDEV_BASE:#x}, so at "
                         f"most {TESTDEV_BASE >> 20} MiB")
    return value


@dataclass
class ExitRequest:
    """isa-debug-exit was written: the guest asked to end with this status."""
    status: int


class Machine:
    """Guest memory, buses, devices and vCPU runners of one VM on one accelerator."""

    def __init__(self, accel, vm, *, ram_size: int | str = 16 * MiB):
        self.accel = accel
        self.vm = vm
        self.ram_size = check_ram_size(ram_size)
        self.memory = GuestMemory()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.console = Console()
        self.log = ExitLog()
        self.runners: list[VcpuRunner] = []
        self.exit_request: ExitRequest | None = None
        self.reset_request: str | None = None   # what the guest wrote to ask for a reset
        self.poweroff_request: str | None = None  # how the guest switched the machine off
        self.on_close: list = []                # called before the VM closes (device threads)
        self.devices: dict[str, object] = {}
        # Which backend runs the guest shapes how fatal exits are explained.
        self.backend = accel.backend

    # -- pc_memory_init -------------------------------------------------------------------------
    def init_memory(self, log_dirty: bool = False) -> list:
        """Guest RAM from 0, mapped into the VM slot by slot (QEMU: pc_memory_init and
        kvm_set_user_memory_region)."""
        if not self.memory.regions:
            self.memory.add_ram(0, self.ram_size, "pc.ram")
            self.memory.add_mmio(TESTDEV_BASE, 0x1000, "testdev")
        for region in self.memory.regions:
            if region.slot is not None:
                if log_dirty:
                    self.vm.map_memory(region, log_dirty=True)
                else:
                    self.vm.map_memory(region)
        return list(self.memory.regions)

    # -- pc_basic_device_init -------------------------------------------------------------------
    def add_standard_devices(self, nb_cpus: int = 1) -> dict[str, object]:
        """COM1, the debug console, isa-debug-exit, fw_cfg and the MMIO test device."""
        serial = Uart16550(output=self.console.write, name="serial0")
        debugcon = DebugConsole(output=self.console.write)
        debug_exit = IsaDebugExit(on_exit=self._on_debug_exit)
        fw_cfg = FwCfg(self.ram_size, nb_cpus)
        testdev = MmioTestDevice()
        self.pio.register(Uart16550.IOBASE, Uart16550.SIZE, serial)
        self.pio.register(DebugConsole.IOBASE, DebugConsole.SIZE, debugcon)
        self.pio.register(IsaDebugExit.IOBASE, IsaDebugExit.SIZE, debug_exit)
        self.pio.register(FwCfg.IOBASE, FwCfg.SIZE, fw_cfg)
        self.mmio.register(TESTDEV_BASE, MmioTestDevice.SIZE, testdev)
        self.devices = {d.name: d for d in (serial, debugcon, debug_exit, fw_cfg, testdev)}
        return self.devices

    def request_reset(self, cause: str) -> None:
        """The guest asked for a reset (port 0x92, 0xcf9): stop every vCPU, as QEMU does
        with -no-reboot; whoever runs the machine decides whether to reboot it."""
        self.reset_request = cause
        for runner in self.runners:
            runner.stop(f"the guest asked for a reset: {cause}")

    def request_poweroff(self, cause: str) -> None:
        """The guest switched the machine off (ACPI S5): stop every vCPU, as QEMU ends."""
        self.poweroff_request = cause
        for runner in self.runners:
            runner.stop(f"the guest powered off: {cause}")

    def _on_debug_exit(self, status: int) -> None:
        self.exit_request = ExitRequest(status)
        for runner in self.runners:
            runner.stop(f"isa-debug-exit: the guest asked to exit with status {status}")

    # -- vCPUs ---------------------------------------------------------------------------------
    def add_vcpu(self, vcpu, *, log: ExitLog | None = None) -> VcpuRunner:
        """A runner for `vcpu`; its exits go to `log` (the machine's shared log by default)."""
        runner = VcpuRunner(vcpu, self.pio, self.mmio, read_code=self.read_physical,
                            log=self.log if log is None else log, backend=self.backend,
                            inline_port_io=self.accel.capabilities.inline_port_io)
        self.runners.append(runner)
        return runner

    def read_physical(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size)

    def setup_cpu(self, vcpu, mode: CpuMode | str, entry: int, stack: int = 0x8000, **regs):
        """Put `vcpu` in `mode` (GDT and page tables written to RAM) at `entry`; `regs`
        sets general-purpose registers too (e.g. rbx=vcpu index)."""
        setup = setup_mode(mode, vcpu.get_sregs(), self.memory, ram_size=self.ram_size)
        vcpu.set_sregs(setup.sregs)
        vcpu.set_regs(initial_regs(mode, entry, stack).replace(**regs))
        return setup

    def close(self) -> None:
        for callback in self.on_close:
            callback()
        self.on_close.clear()
        for runner in self.runners:
            runner.close()
        self.runners.clear()
        self.vm.close()
        self.memory.close()
