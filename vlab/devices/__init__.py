"""Emulated devices as pure state machines, and the buses that route guest accesses to them.

A device knows nothing of KVM or any accelerator: it is a set of registers that a test can
read and write one at a time, as rust-vmm's vm-superio devices are. What a device prints
and the interrupt line it drives are injected callables, so the same object serves a
unit test, the run loop and a notebook console.
"""
from __future__ import annotations

from vlab.devices.acpi_pm import AcpiPm
from vlab.devices.bus import Bus, BusError, Mapping
from vlab.devices.device import Device
from vlab.devices.debugcon import DebugConsole
from vlab.devices.debugexit import IsaDebugExit
from vlab.devices.fwcfg import FwCfg
from vlab.devices.hpet import Hpet, HpetTicker
from vlab.devices.i8042 import I8042
from vlab.devices.pc_testdev import PcTestdev
from vlab.devices.reset import Port92, ResetControl
from vlab.devices.rtc import CmosRtc
from vlab.devices.testdev import MmioTestDevice
from vlab.devices.uart16550 import Uart16550

__all__ = [
    "AcpiPm", "Bus", "BusError", "CmosRtc", "DebugConsole", "Device", "FwCfg", "Hpet",
    "HpetTicker", "I8042", "IsaDebugExit", "Mapping", "MmioTestDevice", "PcTestdev", "Port92",
    "ResetControl", "Uart16550",
]
