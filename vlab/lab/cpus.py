"""One vCPU of a Lab, as QEMU keeps one CPUState per vCPU: the accelerator's vCPU, the run
loop that drives it, the log of its exits and the register model its views show."""
from __future__ import annotations

from dataclasses import dataclass

from ..machine.exitlog import ExitLog
from ..machine.runloop import VcpuRunner
from .registers import RegisterModel


@dataclass(frozen=True)
class LabCpu:
    vcpu: object            # vlab.kvm.VcpuFd, or the software accelerator's vCPU
    runner: VcpuRunner
    registers: RegisterModel
    exits: ExitLog
